"""The page: two tabs wired to handlers.py, and the server around them (127.0.0.1 by default).

Gradio is imported only here and only when a server is made, after its environment is set: no
analytics or version check, its upload/cache directory inside this server's temporary directory
(removed when the server stops).
"""

import os
import tempfile

from fastddpm.schedulers import BETA_SCHEDULE_SAMPLERS

from . import validation as v
from .denoiser import BETA_SCHEDULES
from .generate import MODELS

__all__ = ["make_temp_root", "build", "serve"]

CSS = ".pixelated img { image-rendering: pixelated; }"


def make_temp_root() -> str:
    """This server's temporary directory; Gradio's uploads and cache go there (set before Gradio
    is imported: it reads GRADIO_TEMP_DIR at import time)."""
    root = tempfile.mkdtemp(prefix="fastddpm-app-")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(root, "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"     # no telemetry, no version check
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")
    return root


def build(handlers):
    """The gr.Blocks of the app, every event wired to ``handlers`` (a handlers.Handlers)."""
    import gradio as gr
    from .generate import model_info
    from .handlers import TARGETS, backend_choices

    max_steps = max(model_info(m)["max_steps"] for m in MODELS)
    h = handlers
    with gr.Blocks(title="fastddpm", analytics_enabled=False) as demo:
        gr.Markdown("# fastddpm: from static to an image\nA DDPM turns Gaussian static into a picture, one "
                    "denoising step at a time. Watch it happen, then train a denoiser yourself.")
        with gr.Tab("Generate from static", id="generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    model = gr.Dropdown(list(MODELS), value="digits", label="model")
                    labels = model_info("digits-cond")["labels"]    # fixed choices: the server checks them too
                    label = gr.Dropdown(labels, value=labels[0], label="label (the digit to draw)", visible=False,
                                        elem_id="gen-label")
                    guidance = gr.Slider(0, v.LIMITS["max_guidance"], value=3.0, step=0.1,
                                         label="guidance scale", visible=False)
                    sampler = gr.Dropdown(list(BETA_SCHEDULE_SAMPLERS), value="ddim", label="sampler")
                    steps = gr.Slider(1, max_steps, value=50, step=1, label="steps")
                    with gr.Row():
                        seed = gr.Number(0, precision=0, minimum=0, maximum=2**32 - 1, label="seed",
                                         elem_id="gen-seed")
                        new_seed = gr.Button("new seed", elem_id="gen-new-seed", scale=0)
                    n = gr.Slider(1, v.LIMITS["max_images"], value=4, step=1, label="number of images")
                    backend = gr.Dropdown(backend_choices(), value="auto", label="backend")
                    go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                    status = gr.Markdown(elem_id="gen-status")
                with gr.Column(scale=1, min_width=240):
                    strip = gr.Image(label="reverse trajectory: x_T (top) → x_0 (bottom)", format="png",
                                     interactive=False, elem_id="gen-strip", elem_classes="pixelated")
                with gr.Column(scale=2):
                    scrub = gr.Slider(0, 50, value=25, step=1, label="scrub through the steps (position)",
                                      elem_id="gen-scrub")
                    caption = gr.Markdown(elem_id="gen-caption")
                    with gr.Row():
                        xt = gr.Image(label="x_t", format="png", interactive=False, elem_id="gen-xt",
                                      elem_classes="pixelated")
                        x0 = gr.Image(label="predicted x̂_0", format="png", interactive=False, elem_id="gen-x0",
                                      elem_classes="pixelated")
                    grid = gr.Image(label="final images", format="png", interactive=False, elem_id="gen-grid",
                                    elem_classes="pixelated")
                    with gr.Row():
                        png = gr.File(label="download PNG grid", interactive=False)
                        gif = gr.File(label="download trajectory GIF", interactive=False)
            run = gr.State(None)

            model.change(h.model_changed, [model], [label, guidance], api_name=False)
            new_seed.click(h.new_seed, None, [seed], api_name="new_seed")
            # show_progress="minimal": Gradio's default full-size overlay animation keeps the browser
            # busy on these 2 cores and slowed click -> strip by ~0.2 s (measured, benchmarks/test_bench_app.py);
            # the minimal one still shows a timer.
            go.click(h.generate, [model, label, guidance, sampler, steps, seed, n, backend],
                     [status, strip, scrub, xt, x0, caption, grid, run], api_name="generate",
                     concurrency_limit=4, show_progress="minimal",
                     ).then(h.downloads, [run], [png, gif], api_name="downloads")
            scrub.input(h.scrub, [scrub, run], [xt, x0, caption], api_name="scrub", trigger_mode="always_last",
                        concurrency_limit=None)

        with gr.Tab("Train a denoiser", id="train"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    target = gr.Radio(list(TARGETS), value=TARGETS[0], label="target")
                    digit = gr.Slider(0, 1796, value=0, step=1, label="digit (index into the data set)")
                    upload = gr.File(label=f"or upload a PNG/JPEG (≤ {v.LIMITS['upload_bytes'] // 2**20} MiB; "
                                     "scaled to 16x16 grayscale)", file_types=[".png", ".jpg", ".jpeg"],
                                     type="filepath")
                    lr = gr.Number(2e-3, label="learning rate", minimum=v.LIMITS["lr"][0], maximum=v.LIMITS["lr"][1])
                    with gr.Row():
                        b0 = gr.Number(1e-4, label="beta_start")
                        b1 = gr.Number(0.02, label="beta_end")
                    schedule = gr.Dropdown(list(BETA_SCHEDULES), value="linear", label="beta schedule")
                    T = gr.Slider(2, v.LIMITS["max_train_timesteps"], value=1000, step=1,
                                  label="diffusion timesteps T")
                    steps_t = gr.Slider(1, v.LIMITS["max_train_steps"], value=500, step=1, label="training steps",
                                        elem_id="train-steps")
                    show_t = gr.Slider(0, 999, value=300, step=1, label="show the noisy input at t",
                                       elem_id="train-show-t")
                    with gr.Row():
                        start = gr.Button("Start", variant="primary", elem_id="train-start")
                        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                    tstatus = gr.Markdown(elem_id="train-status")
                with gr.Column(scale=2):
                    with gr.Row():
                        clean = gr.Image(height=190, label="clean target", format="png", interactive=False,
                                         elem_id="train-clean", elem_classes="pixelated")
                        noisy = gr.Image(height=190, label="noisy input at t", format="png", interactive=False,
                                         elem_id="train-noisy", elem_classes="pixelated")
                        den = gr.Image(height=190, label="denoised output (the model's x̂_0)", format="png",
                                       interactive=False, elem_id="train-denoised", elem_classes="pixelated")
                    with gr.Row():
                        done = gr.Textbox(label="steps done", interactive=False, elem_id="train-done")
                        avg = gr.Textbox(label="average loss (last 20 steps)", interactive=False,
                                         elem_id="train-avg")
                    curve = gr.LinePlot(x="step", y="loss", title="training loss (MSE on the noise)",
                                        elem_id="train-curve", height=260)

            def session_of(request: gr.Request) -> str:
                return request.session_hash or "anonymous"

            def train(target, digit, upload, lr, beta_start, beta_end, schedule, timesteps, steps, show_t,
                      request: gr.Request):
                yield from h.train(target, digit, upload, lr, beta_start, beta_end, schedule, timesteps, steps,
                                   show_t, session=session_of(request))

            def stop_run(request: gr.Request):
                return h.stop(session_of(request))

            def show(t, T_, request: gr.Request):
                return h.set_show_t(t, T_, session_of(request))

            T.change(lambda T_: gr.update(maximum=max(int(T_) - 1, 1) if isinstance(T_, (int, float)) else 999),
                     [T], [show_t], api_name=False)
            start.click(train, [target, digit, upload, lr, b0, b1, schedule, T, steps_t, show_t],
                        [tstatus, clean, noisy, den, done, avg, curve], api_name="train", concurrency_limit=None)
            stop.click(stop_run, None, [tstatus], api_name="stop", concurrency_limit=None)
            show_t.input(show, [show_t, T], [tstatus], api_name="show_t", concurrency_limit=None)

            def closed(request: gr.Request):
                h.close_session(session_of(request))      # the tab closed: its run stops
            demo.unload(closed)
    return demo


def warm_up() -> None:
    """Pay the one-time costs before the first click: the digit targets (scikit-learn's import),
    matplotlib's, torch's first training step (seconds), the bundled models and their engines."""
    import torch
    from .denoiser import DenoiserConfig, DenoiserTrainer, digit_targets
    from .generate import GenerateRequest, generate, model_info
    try:    # Gradio asks matplotlib for its backend in every event: the first ask imports pyplot (~1 s)
        import matplotlib
        matplotlib.get_backend()
    except ImportError:
        pass
    torch.set_num_threads(1)     # one core per training run: runs and sampling share the machine
    DenoiserTrainer(digit_targets()[0], DenoiserConfig(steps=2)).run()
    for m in MODELS:
        info = model_info(m)
        generate(GenerateRequest(model=m, steps=2, n=1, label=info["labels"][0] if info["conditional"] else None))


def _check_port(host: str, port: int) -> None:
    """OSError now if (host, port) cannot be listened on (Gradio would say so only after start-up)."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, port))


def serve(host: str = "127.0.0.1", port: int = 7860, *, max_runs: int = 2, max_seconds: float = 300.0,
          quiet: bool = False) -> None:
    """Run the app until Ctrl-C or SIGTERM; then stop every run and remove the temporary directory."""
    import signal
    import threading
    root = make_temp_root()
    from .handlers import Handlers
    h = Handlers(root, max_runs=max_runs, max_seconds=max_seconds)
    demo = None
    try:
        _check_port(host, port)      # before the warm-up: a taken port fails at once
        warm_up()
        import gradio as gr
        demo = build(h)
        demo.queue(default_concurrency_limit=4)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])   # no web fonts to fetch
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=quiet,
                    max_file_size=2 * v.LIMITS["upload_bytes"], theme=theme, css=CSS, ssr_mode=False,
                    show_error=False, prevent_thread_lock=True)
        # our handlers, installed after Gradio's start-up: the process must get to the clean-up below
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        # always, even with quiet (which silences Gradio's banner): where the app is; the tests read it
        print(f"fastddpm app: serving on http://{host}:{demo.server_port} (temporary files in {root}); "
              "Ctrl-C stops it", flush=True)
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if demo is not None:
            demo.close()
        h.shutdown()
