"""The figure runner: API workflows over DreamBooth subjects x prompt lists x seeds on ComfyUI servers
owned by Ray actors, then CLIP-T / CLIP-I / DINO-I and the table. ``scripts/run_figure.py`` is its
command line; ``cli`` documents the whole run.

    cli        the command line: arguments, checks, the run from plan to table
    params     the ``param:`` convention: which workflow node takes which runner value
    plan       subjects, prompt sets and the jobs, with their deterministic ids
    manifest   what is done (OUT/manifest.json) and the job log (OUT/jobs.log)
    requests   a job as a server request (filled workflow, uploads) and its results as files under OUT
    worker     the Ray actor that owns one ComfyUI server
    cluster    starting or joining Ray and its workers
    scheduler  the driver: jobs to idle workers in dependency order, retries, progress
    metrics    CLIP-T / CLIP-I / DINO-I of the images (eqdiff_core.metrics)
    table      the table (CSV, Markdown, PNG) and what the run used (run_info.json)
"""
