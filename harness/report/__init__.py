"""Run reports: report.json, report.md, report.html and the terminal summary."""
