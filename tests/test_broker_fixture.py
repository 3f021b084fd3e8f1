import socket

import pytest


@pytest.mark.broker
def test_broker_restarts_on_same_port(mosquitto):
    port = mosquitto.port
    mosquitto.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
    mosquitto.start()
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert mosquitto.port == port
