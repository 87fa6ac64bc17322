"""`lvllm monitor`: scrape a vLLM server's /metrics and show what it is doing.

metrics.py        fetch + parse Prometheus text (never raises on bad input)
stats.py          pure maths: counter rates, histogram quantiles, label filters
figures.py        vLLM metric names -> the figures the dashboard shows
engine_metrics.py the CPU-expert engine's per-process .prom files (shared with the plugin)
system.py         CPU per NUMA node, vLLM's CPU share, RAM, GPUs (NVML)
poller.py         ties the above together into one Frame per poll
server.py         the handle `lvllm serve --monitor` passes in, and the log tail
app.py            the Textual dashboard

Nothing here imports Textual except app.py, so the plugin and `--once` stay light.
"""
