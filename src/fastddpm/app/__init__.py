"""The fastddpm web app (``fastddpm app``; ``pip install 'fastddpm[app]'``): watch an image come
out of static, and train a denoiser live.

    generate.py    the "Generate from static" tab's work (fastddpm.sample with a trajectory)
    denoiser.py    the "Train a denoiser" tab's work (a background training run, no Gradio)
    validation.py  every value from the page checked again on the server
    handlers.py    page values -> checked requests -> page values, messages instead of tracebacks
    server.py      the Gradio layout and the server (Gradio is imported there only)
"""
