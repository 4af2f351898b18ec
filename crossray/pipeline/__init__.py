"""The crossray pipeline without Ray: stage keys (`inputs`), stage bodies (`stages`), the run
(`runner`) and its summaries (`summary`). `jobs/pipeline.py` runs it with a Ray backend."""
