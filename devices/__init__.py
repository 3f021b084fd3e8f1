"""Device knowledge as data: profiles (profiles/*.toml, `profile.py`), detection from a filesystem root
(`detect.py`) and device-specific sensor drivers (`serial_line.py`). Nothing here runs at import time."""
