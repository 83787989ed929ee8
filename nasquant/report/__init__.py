"""The FP32-vs-INT8 report: rows per artifact, report.json / report.md / accuracy_latency.png, CI gate."""

from nasquant.report.files import compare_reports, load_report, write_report
from nasquant.report.markdown import host_summary, render_comparison, render_markdown
from nasquant.report.rows import ReportRow, artifact_size_mb, check_drop, finalize_rows

__all__ = [
    "ReportRow",
    "artifact_size_mb",
    "check_drop",
    "compare_reports",
    "finalize_rows",
    "host_summary",
    "load_report",
    "render_comparison",
    "render_markdown",
    "write_report",
]
