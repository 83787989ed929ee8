"""``nasquant quantize RECIPE``: load → calibrate → select → finetune → export → engines → evaluate →
report, as stage functions, each taking typed results and returning one (``load.Loaded``,
``calibrate.Calibrated``, ``select.Selection``, ``export.Exported``, ...).

Every cached stage's result is recorded in ``stages.json`` under a key built from everything it reads
(:mod:`nasquant.pipeline.context`), so ``--resume`` reuses exactly the stages whose inputs are
unchanged. Every file is written under a temporary name and renamed when complete, so an interrupted
run never leaves a half-written artifact under a final name.
"""

from nasquant.pipeline.export_job import ExportResult, run_export
from nasquant.pipeline.run import open_run, run_quantize, run_sensitivity

__all__ = ["ExportResult", "open_run", "run_export", "run_quantize", "run_sensitivity"]
