"""``pretrain.plan``: predict the speed (and, next, the memory) of a layout before the job waits in the queue.

    python -m pretrain.plan validate --points FILE.csv    # predicted vs published TFLOP/s per GPU, one row a point
    python -m pretrain.plan fit --points FILE.csv         # refit the speed model's constants

``hardware.py`` the GPU table, ``speed.py`` the step-time model, ``points.py`` published runs as inputs.
"""
