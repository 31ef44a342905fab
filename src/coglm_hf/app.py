"""`coglm-hf serve`: a Gradio app with three tabs — Generate, Edit, Caption — on one CogView2 pipeline.

The three pipelines share one set of weights (`from_pipe`). Every request goes through one queue (one model, one
request at a time; others wait their turn). The named API endpoints `/generate`, `/edit` and `/caption` can be
called with `gradio_client` like any Space. Bad input raises `gr.Error`, which the page shows as a message and the
API returns as an error; an unexpected failure of one request is reported the same way and the server keeps
serving.

Offline by design: telemetry and the version check are off (`GRADIO_ANALYTICS_ENABLED=False`, set before gradio is
imported), the theme uses the system's fonts instead of web fonts, server-side rendering (a Node process) is off,
and nothing is shared through a tunnel. Needs the `app` extra: `pip install "coglm-hf[app]"`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

logger = logging.getLogger(__name__)

QUEUE_ID = "cogview2-model"
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('the app needs Gradio: pip install "coglm-hf[app]"') from None
    return gr


def offline_theme(gr):
    """Gradio's default theme with system fonts (the default loads web fonts from a font CDN)."""
    return gr.themes.Default(
        font=[gr.themes.Font("ui-sans-serif"), gr.themes.Font("system-ui"), "sans-serif"],
        font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("Consolas"), "monospace"],
    )


class CogView2App:
    """The request handlers (plain methods, callable without a browser) and the Gradio layout around them.

    Args:
        pipeline: a loaded `CogView2Pipeline` (its components are shared with the editing and caption pipelines).
        max_images: most images (or captions) one request may ask for.
    """

    def __init__(self, pipeline, max_images: int = 4):
        from .pipeline_cogview2_caption import CogView2CaptionPipeline
        from .pipeline_cogview2_inpaint import CogView2InpaintPipeline

        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.gr = _import_gradio()
        self.pipeline = pipeline
        self.editor = CogView2InpaintPipeline.from_pipe(pipeline)
        self.captioner = CogView2CaptionPipeline.from_pipe(pipeline)
        for pipe in (self.pipeline, self.editor, self.captioner):
            pipe.set_progress_bar_config(disable=True)
        self.max_images = max_images
        self.styles = list(pipeline.scheduler.styles)

    # -------------------------------------------------------------------------------------------- checks
    def _fail(self, message: str):
        raise self.gr.Error(message, print_exception=False)

    def _count(self, name: str, value, low: int = 1) -> int:
        try:
            count = int(value)
        except (TypeError, ValueError):
            self._fail(f"{name} must be a whole number, got {value!r}")
        if count != value and not (isinstance(value, float) and value.is_integer()):
            self._fail(f"{name} must be a whole number, got {value!r}")
        if not low <= count <= self.max_images:
            self._fail(f"{name} must be between {low} and {self.max_images} (this server's limit), got {count}")
        return count

    def _generator(self, seed) -> torch.Generator:
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            self._fail(f"the seed must be a whole number, got {seed!r}")
        return torch.Generator(self.pipeline.device.type).manual_seed(seed)

    def _run(self, what: str, call):
        """Run one pipeline call: user errors become a message, other failures are logged and reported."""
        try:
            return call()
        except self.gr.Error:
            raise
        except USER_ERRORS as error:
            self._fail(str(error))
        except Exception as error:  # one request's failure must not take the server down
            logger.exception("%s failed", what)
            self._fail(f"{what} failed: {type(error).__name__}: {error}")

    @staticmethod
    def _open_image(image, what: str):
        if image is None:
            return None
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            return PIL.Image.fromarray(image[..., :3].astype(np.uint8))
        try:
            with PIL.Image.open(image) as opened:
                return opened.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError):
            raise ValueError(f"the {what} is not an image PIL can read; upload a PNG, JPEG or WebP file") from None

    # -------------------------------------------------------------------------------------------- handlers
    def generate(self, prompt: str, style: str, num_images, num_candidates, seed, progress=None):
        """Text → images. `num_candidates` 0 turns post-selection off. Returns the images."""
        if not isinstance(prompt, str) or not prompt.strip():
            self._fail("The prompt is empty: describe the image to generate.")
        if style not in self.styles:
            self._fail(f"unknown style {style!r}; choose one of {', '.join(self.styles)}")
        count = self._count("the number of images", num_images)
        candidates = None
        if num_candidates not in (None, 0, "0", ""):
            try:
                candidates = int(num_candidates)
            except (TypeError, ValueError):
                self._fail(f"the number of candidates must be a whole number, got {num_candidates!r}")
            if not count <= candidates <= 4 * self.max_images:
                self._fail(f"candidates must be 0 (off) or between the number of images ({count}) and "
                           f"{4 * self.max_images}, got {candidates}")
        generator = self._generator(seed)
        cells = self.pipeline.base_model.config.image_grid_size ** 2
        passes = len(self.pipeline.scheduler.sampler_settings(style)["itersr_top_k"])

        def report(pipe, step, stage, tensors):
            if progress is not None:
                if stage == "stage1":
                    progress((step + 1) / cells, desc=f"stage 1: token {step + 1} of {cells}")
                elif stage == "selection":
                    progress(1.0, desc="post-selection")
                elif stage == "dsr":
                    progress(1.0, desc="direct super-resolution")
                else:
                    progress((step + 1) / passes, desc=f"iterative super-resolution: pass {step + 1} of {passes}")
            return {}

        output = self._run("generation", lambda: self.pipeline(
            prompt, num_images_per_prompt=count, num_candidates=candidates, style=style, generator=generator,
            callback_on_step_end=report, callback_on_step_end_tensor_inputs=()))
        return output.images

    def edit(self, editor_value, prompt: str, box: str, num_images, seed, progress=None):
        """Image + painted mask (or a box) + prompt → edited images."""
        if not isinstance(prompt, str) or not prompt.strip():
            self._fail("The prompt is empty: describe what the painted region should show.")
        editor_value = editor_value or {}
        image = self._run("reading the image", lambda: self._open_image(editor_value.get("background"), "image"))
        if image is None:
            self._fail("No image: upload one (or use a generated image) in the Edit tab.")
        count = self._count("the number of images", num_images)
        mask_box = mask = None
        if box and box.strip():
            try:
                mask_box = [float(v) for v in box.split(",")]
            except ValueError:
                self._fail(f"the box must be four comma-separated fractions top,left,bottom,right, got {box!r}")
        else:
            mask = self.painted_mask(editor_value.get("layers") or [], image.size)
            if mask is None:
                self._fail("No mask: paint the region to change with the brush, or give a box.")
        generator = self._generator(seed)
        if progress is not None:
            progress(0.0, desc="editing")
        output = self._run("editing", lambda: self.editor(
            prompt, image=image, mask_image=mask, mask_box=mask_box, num_images_per_prompt=count, style="none",
            generator=generator))
        return output.images

    def painted_mask(self, layers, size: tuple[int, int]):
        """Union of the painted strokes of the editor's layers (alpha > 0) as an "L" mask of `size`, or None."""
        painted = None
        for layer in layers:
            if layer is None:
                continue
            if not isinstance(layer, PIL.Image.Image):
                layer = self._open_image_rgba(layer)
            alpha = np.asarray(layer.convert("RGBA").resize(size, PIL.Image.Resampling.NEAREST))[..., 3] > 0
            painted = alpha if painted is None else painted | alpha
        if painted is None or not painted.any():
            return None
        return PIL.Image.fromarray(painted.astype(np.uint8) * 255, mode="L")

    @staticmethod
    def _open_image_rgba(layer):
        if isinstance(layer, np.ndarray):
            return PIL.Image.fromarray(layer.astype(np.uint8))
        with PIL.Image.open(layer) as opened:
            return opened.convert("RGBA")

    def caption(self, image, language: str, num_captions) -> str:
        """Image → captions, one per line (best caption score first)."""
        picture = self._run("reading the image", lambda: self._open_image(image, "upload"))
        if picture is None:
            self._fail("No image: upload an image to caption.")
        if language not in ("en", "zh"):
            self._fail(f"language must be 'en' or 'zh', got {language!r}")
        count = self._count("the number of captions", num_captions)
        output = self._run("captioning", lambda: self.captioner(
            picture, language=language, num_captions_per_image=count, num_beams=1 if count == 1 else max(4, count),
            rank_by_score=count > 1))
        return "\n".join(output.captions[0])

    # -------------------------------------------------------------------------------------------- layout
    def build(self):
        """The `gr.Blocks` app (not launched)."""
        gr = self.gr
        queue = {"concurrency_id": QUEUE_ID, "concurrency_limit": 1}
        with gr.Blocks(title="CogView2", analytics_enabled=False) as blocks:
            gr.Markdown("# CogView2\nText → image, text-guided editing and captioning with the CogLM family.")
            last_images = gr.State([])
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", placeholder="a yellow circle on a black background",
                                            elem_id="generate-prompt")
                        style = gr.Dropdown(self.styles, value="mainbody", label="Style")
                        num_images = gr.Slider(1, self.max_images, value=1, step=1, label="Images")
                        candidates = gr.Number(0, precision=0, label="Candidates for post-selection (0: off)")
                        seed = gr.Number(0, precision=0, label="Seed")
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    gallery = gr.Gallery(label="Results", columns=2, elem_id="generate-gallery", format="png")
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column():
                        editor = gr.ImageEditor(label="Image (paint the region to change)", type="pil",
                                                image_mode="RGBA", elem_id="edit-image",
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                transforms=(), layers=False, canvas_size=(480, 480))
                        use_generated = gr.Button("Use the first generated image")
                        edit_prompt = gr.Textbox(label="Prompt", elem_id="edit-prompt")
                        box = gr.Textbox(label="Or a box: top,left,bottom,right as fractions (overrides the brush)",
                                         placeholder="0.25,0.5,1,1")
                        edit_images = gr.Slider(1, self.max_images, value=1, step=1, label="Images")
                        edit_seed = gr.Number(0, precision=0, label="Seed")
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    edit_gallery = gr.Gallery(label="Edits", columns=2, elem_id="edit-gallery", format="png")
            with gr.Tab("Caption", id="caption"):
                with gr.Row():
                    with gr.Column():
                        caption_image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                                 elem_id="caption-image")
                        language = gr.Radio(["en", "zh"], value="en", label="Language")
                        num_captions = gr.Slider(1, self.max_images, value=1, step=1, label="Captions")
                        caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    captions = gr.Textbox(label="Captions", lines=4, elem_id="caption-output")

            tracker = gr.Progress()  # gradio recognises the default and passes each request its own tracker

            def run_generate(prompt, style, num_images, candidates, seed, progress=tracker):
                images = self.generate(prompt, style, num_images, candidates, seed, progress)
                return images, images

            def run_edit(value, prompt, box, num_images, seed, progress=tracker):
                return self.edit(value, prompt, box, num_images, seed, progress)

            generate_button.click(run_generate, [prompt, style, num_images, candidates, seed], [gallery, last_images],
                                  api_name="generate", **queue)
            edit_button.click(run_edit, [editor, edit_prompt, box, edit_images, edit_seed], edit_gallery,
                              api_name="edit", **queue)
            caption_button.click(self.caption, [caption_image, language, num_captions], captions, api_name="caption",
                                 **queue)
            use_generated.click(self.use_generated, last_images, editor, api_visibility="private")
        return blocks

    def use_generated(self, images):
        if not images:
            self._fail("Nothing generated yet: generate an image in the Generate tab first.")
        image = images[0]
        if not isinstance(image, PIL.Image.Image):
            image = self._open_image(image, "generated image")
        return {"background": image, "layers": [], "composite": image}


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          dtype: str = "auto", max_images: int = 4, block: bool = True):
    """Load the pipeline (default: the demo model) and launch the app. Returns the running `gr.Blocks` when
    `block=False`."""
    from .pipeline_cogview2 import CogView2Pipeline

    gr = _import_gradio()
    if model is None:
        from .demo import default_model_path

        model = str(default_model_path())
    elif not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model} is not a folder; convert the official files first with "
                                "`coglm-hf convert`")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = (torch.float16 if target.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch,
                                                                                                          dtype)
    pipeline = CogView2Pipeline.from_pretrained(model, dtype=torch_dtype).to(target)
    blocks = CogView2App(pipeline, max_images=max_images).build()
    blocks.queue(max_size=32)
    blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                  theme=offline_theme(gr), show_error=True, prevent_thread_lock=not block, quiet=False)
    return blocks


__all__ = ["CogView2App", "offline_theme", "serve"]
