"""Performance tools: analytic FLOPs, the benchmark's timed step and report, step traces."""
