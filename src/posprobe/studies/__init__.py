"""The paper's protocol and its extensions as studies: tables and figures as data (``presets``, ``paper``), the
study runner (``study``), its report and figures, ``reproduce`` and the ``demo``, a command's probe run
(``probe_run``), the ``layer_curve`` and the benchmark (``bench``)."""
