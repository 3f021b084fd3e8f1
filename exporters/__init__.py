"""The server side: recipes -> torch/scikit-learn models -> ONNX -> INT8 -> parity -> signed bundle, and the
evaluations on real data. Needs the `train` extra; the agent never imports it (.importlinter).

    metrics.py    every metric the three rooms report (imports none of them)
    training/     a recipe's rows, the models, fitting, the run directory and its report
    export/       ONNX, quantization, parity, gate calibration, the signed bundle (imports training)
    evaluation/   the `edgekit eval` evaluations (imports training and export)
"""
