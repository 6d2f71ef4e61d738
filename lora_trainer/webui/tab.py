"""The Train LoRA tab (gradio 3.41, as pinned by WebUI 1.10): settings on the left in the guide's
order, the run on the right (train/stop, live status and loss chart, saved files, samples, the
epochs x weights comparison).

Which fields appear where is the table in :mod:`.tab_fields`; what the buttons do is in
:mod:`.tab_actions`. gradio and ``modules`` are imported inside functions only.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List

from ..config import TrainConfig
from . import tab_actions as act
from . import tab_fields as tf
from . import tab_tools

log = logging.getLogger(__name__)

TAB_TITLE = "Train LoRA"
TAB_ID = "lora_trainer"
POLL_SECONDS = 1


class _UI:
    """The components by name, so the builders and the wiring can find each other."""

    def __init__(self):
        self.fields: Dict[str, Any] = {}   # TrainConfig field -> component
        self.c: Dict[str, Any] = {}        # everything else

    def field_list(self) -> List[Any]:
        return [self.fields[n] for n in tf.ui_fields()]


def create_tab():
    """``script_callbacks.on_ui_tabs`` callback: ``[(blocks, title, elem_id)]``."""
    import gradio as gr
    tf._live_choices()
    ui = _UI()
    with gr.Blocks(analytics_enabled=False) as blocks:
        _build_header(ui)
        with gr.Row(equal_height=False, elem_id="lora_trainer_main"):
            with gr.Column(scale=3, elem_id="lora_trainer_settings"):
                _build_settings(ui)
            with gr.Column(scale=2, elem_id="lora_trainer_run"):
                _build_run(ui)
                _build_xyz(ui)
        tab_tools.build_tools_section()
        _wire_config(ui)
        _wire_run(ui, blocks)
        _wire_xyz(ui)
    return [(blocks, TAB_TITLE, TAB_ID)]


# ------------------------------------------------------------------ builders
def _no_save(*components) -> None:
    """Keep computed text out of the WebUI's ui-config.json."""
    for comp in components:
        comp.do_not_save_to_config = True


def _field(name: str):
    import gradio as gr
    default = tf.to_ui(name, getattr(TrainConfig(), name))
    kind = tf.kind(name)
    kw = dict(label=name, info=tf.help_text(name), elem_id=f"lora_trainer_{name}")
    if kind == "bool":
        return gr.Checkbox(value=default, **kw)
    if kind == "choice":
        choices, custom = tf.CHOICES[name]
        choices = list(choices) if default in choices else [default] + list(choices)
        return gr.Dropdown(choices=choices, value=default, allow_custom_value=custom, **kw)
    if kind in ("int", "float"):
        return gr.Number(value=default, precision=0 if kind == "int" else None, **kw)
    placeholder = {"optional": "empty = not set", "list": "key=value key=value"}.get(kind)
    lines = tf.LINES.get(name, 1)
    return gr.Textbox(value=default, lines=lines, max_lines=lines * 4, placeholder=placeholder, **kw)


def _build_settings(ui: _UI) -> None:
    import gradio as gr
    for key, title, rows, open_ in tf.SECTIONS:
        with gr.Accordion(title, open=open_, elem_id=f"lora_trainer_section_{key}"):
            for row in rows:
                with gr.Row():
                    for name in row:
                        ui.fields[name] = _field(name)
                if "optimizer_args" in row:  # the guide's arguments / learning rate for the optimizer just picked
                    ui.c["optimizer_hint"] = gr.Markdown("", elem_id="lora_trainer_optimizer_hint")
            extra = _SECTION_EXTRAS.get(key)
            if extra is not None:
                extra(ui)


def _build_dataset_extra(ui: _UI) -> None:
    import gradio as gr
    with gr.Row():
        ui.c["subject"] = gr.Radio(["character", "style"], value="character", label="You train a",
                                   info="Which of the guide's numbers the check uses (presets set it).",
                                   elem_id="lora_trainer_subject")
        with gr.Column(scale=0, min_width=160):
            ui.c["check"] = gr.Button("Check dataset", elem_id="lora_trainer_check")
    ui.c["report"] = gr.Markdown("Choose the dataset folder, then press **Check dataset** (or Enter).",
                                 elem_id="lora_trainer_report")


def _build_optimizer_extra(ui: _UI) -> None:
    import gradio as gr
    with gr.Row():
        with gr.Column(scale=0, min_width=200):
            ui.c["lr_plot"] = gr.Button("Plot learning rate", size="sm", elem_id="lora_trainer_lr_plot")
        ui.c["lr_plot_msg"] = gr.Markdown("", elem_id="lora_trainer_lr_plot_msg")
    ui.c["lr_plot_img"] = gr.Image(label="Learning rate", type="pil", interactive=False, visible=False,
                                   show_label=False, elem_id="lora_trainer_lr_plot_img")


def _build_saving_extra(ui: _UI) -> None:
    import gradio as gr
    ui.c["output_path"] = gr.Markdown(act.output_path_text(TrainConfig().output_name),
                                      elem_id="lora_trainer_output_path")


_SECTION_EXTRAS = {"dataset": _build_dataset_extra, "optimizer": _build_optimizer_extra,
                   "saving": _build_saving_extra}


def _build_header(ui: _UI) -> None:
    import gradio as gr
    from ..presets import preset_names
    ui.c["model"] = gr.Markdown(_model_text(), elem_id="lora_trainer_model")
    with gr.Row(elem_id="lora_trainer_presets"):
        ui.c["preset"] = gr.Dropdown(label="Preset", choices=preset_names("sdxl") + preset_names(), value=None, scale=2,
                                     info="Card memory × subject; overwrites the fields it sets.",
                                     elem_id="lora_trainer_preset")
        with gr.Column(scale=0, min_width=130):
            ui.c["preset_apply"] = gr.Button("Apply preset", elem_id="lora_trainer_preset_apply")
        ui.c["config_path"] = gr.Textbox(label="Config file (.toml)", scale=3,
                                         placeholder="empty = <Lora folder>/<output_name>/<output_name>.toml",
                                         info="Ours, or an sd-scripts / kohya_ss one to import.",
                                         elem_id="lora_trainer_config_path")
        with gr.Column(scale=0, min_width=100):
            ui.c["config_save"] = gr.Button("Save", size="sm", elem_id="lora_trainer_config_save")
            ui.c["config_load"] = gr.Button("Load", size="sm", elem_id="lora_trainer_config_load")
    ui.c["preset_info"] = gr.Markdown("", elem_id="lora_trainer_preset_info")
    ui.c["config_msg"] = gr.Markdown("", elem_id="lora_trainer_config_msg")
    with gr.Accordion("Upload a TOML / show these settings as TOML", open=False, elem_id="lora_trainer_toml"):
        with gr.Row():
            ui.c["config_upload"] = gr.File(label="Upload a .toml file", file_types=[".toml"], type="file",
                                            elem_id="lora_trainer_config_upload")
            with gr.Column():
                ui.c["toml_show"] = gr.Button("Show as TOML", size="sm", elem_id="lora_trainer_toml_show")
                ui.c["toml_text"] = gr.Textbox(label="TOML", lines=8, max_lines=30, show_copy_button=True,
                                               elem_id="lora_trainer_toml_text")
    _no_save(ui.c["config_path"], ui.c["toml_text"])


def _build_run(ui: _UI) -> None:
    import gradio as gr
    with gr.Row(elem_id="lora_trainer_buttons"):
        ui.c["train"] = gr.Button("Train", variant="primary", elem_id="lora_trainer_train")
        ui.c["stop"] = gr.Button("Stop", variant="stop", elem_id="lora_trainer_stop")
    with gr.Row(elem_id="lora_trainer_resume_row"):
        ui.c["resume_run"] = gr.Dropdown(label="Unfinished runs", choices=act.unfinished_choices(), value=None,
                                         scale=3, info="Runs with a saved training state that did not finish "
                                         "(a WebUI restart, a crash, Stop). Resume continues where the state was saved.",
                                         elem_id="lora_trainer_resume_run")
        from modules.ui_components import ToolButton
        ui.c["resume_refresh"] = ToolButton("🔄", elem_id="lora_trainer_resume_refresh",
                                            tooltip="Refresh unfinished runs")
        with gr.Column(scale=0, min_width=130):
            ui.c["resume"] = gr.Button("Resume", elem_id="lora_trainer_resume")
    ui.c["train_msg"] = gr.Markdown("", elem_id="lora_trainer_train_msg")
    ui.c["status"] = gr.HTML(act.status_html({"state": "idle"}), elem_id="lora_trainer_status")
    ui.c["chart"] = gr.LinePlot(x="step", y="loss", color="series", title="Loss", show_label=False, width=440,
                                height=220, tooltip=["step", "loss", "series"], color_legend_position="bottom",
                                color_legend_title="", visible=False, elem_id="lora_trainer_chart")
    ui.c["files"] = gr.Markdown("", elem_id="lora_trainer_files")
    ui.c["gallery"] = gr.Gallery(label="Samples", columns=5, height=240, object_fit="contain", visible=False,
                                 elem_id="lora_trainer_samples")
    ui.c["seen"] = gr.State({})


def _build_xyz(ui: _UI) -> None:
    import gradio as gr
    from modules.ui_components import ToolButton
    with gr.Accordion("Compare epochs × weights (X/Y/Z plot)", open=True, elem_id="lora_trainer_xyz"):
        with gr.Row():
            ui.c["xyz_folder"] = gr.Dropdown(label="Run folder", choices=_safe_folders(), value=None,
                                             info="Under the Lora folder; X = its epoch files.",
                                             elem_id="lora_trainer_xyz_folder")
            ui.c["xyz_refresh"] = ToolButton("🔄", elem_id="lora_trainer_xyz_refresh", tooltip="Refresh run folders")
        with gr.Row():
            ui.c["xyz_weights"] = gr.Textbox(label="LoRA weights (Y)", value="0.7-1.5 [5]",
                                             elem_id="lora_trainer_xyz_weights")
            ui.c["xyz_seeds"] = gr.Checkbox(label="Seeds variant", value=False,
                                            info="Y = Seed -1--1 [8] at weight 1", elem_id="lora_trainer_xyz_seeds")
        ui.c["xyz_prompt"] = gr.Textbox(label="Prompt (after the trigger words)", lines=2,
                                        elem_id="lora_trainer_xyz_prompt")
        ui.c["xyz_negative"] = gr.Textbox(label="Negative prompt", elem_id="lora_trainer_xyz_negative")
        with gr.Row():
            ui.c["xyz_steps"] = gr.Number(label="Steps", value=20, precision=0, min_width=80,
                                          elem_id="lora_trainer_xyz_steps")
            ui.c["xyz_width"] = gr.Number(label="Width (0 = the run's)", value=0, precision=0, min_width=80,
                                          elem_id="lora_trainer_xyz_width")
            ui.c["xyz_height"] = gr.Number(label="Height (0 = the run's)", value=0, precision=0, min_width=80,
                                           elem_id="lora_trainer_xyz_height")
            ui.c["xyz_seed"] = gr.Number(label="Seed", value=1234, precision=0, min_width=80,
                                         elem_id="lora_trainer_xyz_seed")
        ui.c["xyz_infotext"] = gr.Textbox(label="Preset (or paste it into the txt2img prompt and press ↙)", lines=3,
                                          interactive=False, show_copy_button=True,
                                          elem_id="lora_trainer_xyz_infotext")
        ui.c["xyz_msg"] = gr.Markdown("", elem_id="lora_trainer_xyz_msg")
        with gr.Row():
            ui.c["xyz_send"] = gr.Button("Send to txt2img", elem_id="lora_trainer_xyz_send")
            ui.c["xyz_render"] = gr.Button("Render grid here", elem_id="lora_trainer_xyz_render")
        ui.c["xyz_grid"] = gr.Image(label="Grid", type="pil", interactive=False, visible=False,
                                    elem_id="lora_trainer_xyz_grid")
    _no_save(ui.c["xyz_infotext"])
    _register_paste(ui.c["xyz_send"], ui.c["xyz_infotext"])


def _register_paste(button, textbox) -> None:
    """The WebUI's own paste path (as PNG Info > Send to txt2img): it reads the textbox's value at
    click time, fills txt2img, selects X/Y/Z plot with its axes and switches tabs."""
    try:
        from modules import infotext_utils
    except ImportError:  # WebUI < 1.8
        from modules import generation_parameters_copypaste as infotext_utils
    infotext_utils.register_paste_params_button(
        infotext_utils.ParamBinding(paste_button=button, tabname="txt2img", source_text_component=textbox))


# ------------------------------------------------------------------ wiring
def _values(args) -> Dict[str, Any]:
    return dict(zip(tf.ui_fields(), args))


def _updates_for(values: Dict[str, Any]) -> List[Any]:
    """One update per field, in field order: the given values, the rest left alone."""
    import gradio as gr
    return [gr.update(value=values[n]) if n in values else gr.update() for n in tf.ui_fields()]


def _wire_config(ui: _UI) -> None:
    import gradio as gr
    fields, c = ui.field_list(), ui.c
    quiet = dict(show_progress="hidden")

    def apply_preset(name):
        if not name:
            return _updates_for({}) + [gr.update(), "Choose a preset first."]
        values, subject, desc = act.preset_values(name)
        return _updates_for(values) + [subject, f"Applied **{name}**: {desc}"]

    c["preset_apply"].click(apply_preset, [c["preset"]], fields + [c["subject"], c["preset_info"]], **quiet)
    c["preset"].change(lambda n: f"**{n}**: {act.preset_values(n)[2]}" if n else "", [c["preset"]],
                       [c["preset_info"]], **quiet)

    def load(path):
        values, msg = act.load_config(path)
        return _updates_for(values or {}) + [msg]

    def upload(file):
        return load(getattr(file, "name", file)) if file is not None else _updates_for({}) + [""]

    c["config_load"].click(load, [c["config_path"]], fields + [c["config_msg"]], **quiet)
    c["config_upload"].upload(upload, [c["config_upload"]], fields + [c["config_msg"]], **quiet)
    c["config_save"].click(lambda path, *a: act.save_config(path, _values(a)), [c["config_path"]] + fields,
                           [c["config_msg"]], **quiet)
    c["toml_show"].click(lambda *a: act.config_toml(_values(a)), fields, [c["toml_text"]], **quiet)

    check = dict(fn=lambda subject, *a: act.check_dataset(_values(a), subject), inputs=[c["subject"]] + fields,
                 outputs=[c["report"]])
    c["check"].click(**check)
    ui.fields["train_data_dir"].submit(**check)
    ui.fields["train_data_dir"].blur(**check, **quiet)

    def plot(*a):
        img, msg = act.lr_plot(_values(a))
        return gr.update(value=img, visible=img is not None), msg

    c["lr_plot"].click(plot, fields, [c["lr_plot_img"], c["lr_plot_msg"]])

    def optimizer_picked(name, args):  # the user's pick only (.input): a preset or a loaded file sets both fields
        new, hint = act.optimizer_change(name, args)
        return gr.update() if new is None else new, hint

    ui.fields["optimizer_type"].input(optimizer_picked, [ui.fields["optimizer_type"], ui.fields["optimizer_args"]],
                                      [ui.fields["optimizer_args"], c["optimizer_hint"]], **quiet)
    for event in (c["preset_apply"].click, c["config_load"].click, c["config_upload"].upload):
        event(lambda: "", None, [c["optimizer_hint"]], **quiet)  # a preset or a file replaces the optimizer
    ui.fields["output_name"].change(act.output_path_text, [ui.fields["output_name"]], [c["output_path"]], **quiet)


def _wire_run(ui: _UI, blocks) -> None:
    import gradio as gr
    c = ui.c
    c["train"].click(lambda *a: act.train(_values(a)), ui.field_list(), [c["train_msg"]], show_progress="hidden")
    c["stop"].click(act.stop, None, [c["train_msg"]], show_progress="hidden")
    c["resume"].click(act.resume, [c["resume_run"]], [c["train_msg"]], show_progress="hidden")
    c["resume_refresh"].click(lambda: gr.update(choices=act.unfinished_choices()), None, [c["resume_run"]],
                              show_progress="hidden")
    outputs = [c["status"], c["chart"], c["files"], c["gallery"], c["xyz_folder"], c["model"], c["seen"]]

    def poll(seen):
        try:
            return _poll(seen or {})
        except Exception as e:  # never let the timer die
            log.debug("lora_trainer: status poll failed: %s", e)
            return [gr.update()] * (len(outputs) - 1) + [seen]

    blocks.load(poll, [c["seen"]], outputs, every=POLL_SECONDS, show_progress="hidden")


def _poll(seen: dict) -> list:
    """The status line every second; the chart, files, samples, run folders and model only when changed."""
    import gradio as gr
    from . import runtime
    st = runtime.status()
    prog = runtime.get_service().progress
    steps, epochs = list(prog.step_losses), list(prog.epoch_losses)
    new = dict(seen)

    def changed(key, value):
        if seen.get(key) == value:
            return False
        new[key] = value
        return True

    run = st.get("run_id")
    out = [act.status_html(st)]
    if changed("chart", [run, len(steps), len(epochs)]):
        rows = act.loss_rows(steps, epochs, st.get("total_steps") or 0, st.get("total_epochs") or 0)
        out.append(gr.update(value=_chart_frame(rows), visible=bool(rows)))
    else:
        out.append(gr.update())
    files = list(st.get("files") or [])
    files_changed = changed("files", [run, files, st.get("state")])
    out.append(act.files_markdown(files, st.get("output_dir")) if files_changed and run else gr.update())
    samples = list(st.get("samples") or [])
    if changed("samples", [run, samples]):
        items = act.gallery_items(samples)
        out.append(gr.update(value=items, visible=bool(items)))
    else:
        out.append(gr.update())
    # a run that saved files is offered for the comparison right away
    if files_changed and files:
        out.append(gr.update(choices=_safe_folders(), value=act.folder_of_run(st.get("output_dir"))))
    else:
        out.append(gr.update())
    model = _model_text()
    out.append(model if changed("model", model) else gr.update())
    out.append(new)
    return out


def _chart_frame(rows):
    import pandas as pd
    return pd.DataFrame(rows or [], columns=["step", "loss", "series"])


def _wire_xyz(ui: _UI) -> None:
    import gradio as gr
    c = ui.c
    inputs = [c[k] for k in ("xyz_folder", "xyz_weights", "xyz_seeds", "xyz_prompt", "xyz_negative", "xyz_steps",
                             "xyz_width", "xyz_height", "xyz_seed")]
    outputs = [c["xyz_infotext"], c["xyz_msg"]]
    # the paste button reads the textbox at click time: keep it filled as the inputs change
    for comp in inputs:
        comp.change(act.xyz_infotext, inputs, outputs, show_progress="hidden")
    # a run in progress adds epoch files to the chosen folder: the poll rewrites the files list then
    c["files"].change(act.xyz_infotext, inputs, outputs, show_progress="hidden")
    c["xyz_refresh"].click(lambda: gr.update(choices=_safe_folders()), None, [c["xyz_folder"]],
                           show_progress="hidden")

    def render(*a):
        img, msg = act.render_grid(*a)
        return gr.update(value=img, visible=img is not None), msg

    c["xyz_render"].click(render, inputs, [c["xyz_grid"], c["xyz_msg"]])


# ------------------------------------------------------------------ small helpers
def _model_text() -> str:
    from . import runtime
    try:
        summary = runtime.model_summary()
    except Exception as e:
        summary = f"unknown ({type(e).__name__}: {e})"
    return f"**Trains on the loaded model:** {summary}. Change it with the checkpoint menu at the top of the page."


def _safe_folders() -> List[str]:
    try:
        return act.run_folder_choices()
    except Exception as e:
        log.debug("lora_trainer: cannot list run folders: %s", e)
        return []
