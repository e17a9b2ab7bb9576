"""batch: the offline batch job, `pipemax serve-offline`.

Owns
    requests.py      OpenAI batch JSONL lines -> runnable items, or an error record for that line
    results_file.py  the results file: appended and flushed per request, locked, resumable
    job.py           the job loop: read, skip what is done, run through an LLM, write, summarise
    summary.py       the run summary's lines from the engine's figures

May import: core (SamplingParams). It drives any object with the API's `generate` shape (the
`pipemax.LLM` the CLI builds), so it needs nothing of the engine below it; it never imports api
or cli.
"""
