"""HTTP API, registered at app start:

- ``POST /lora-trainer/v1/train``: body = the config as JSON with sd-scripts names -> ``{"run_id"}``;
  400 with the message for a bad config or dataset, 409 while a run is active.
- ``GET /lora-trainer/v1/status``: state, run_id, epoch, step, total_steps, loss, files, error, ...
- ``POST /lora-trainer/v1/stop``
- ``GET /lora-trainer/v1/xyz?run_id=&weights=&seeds=``: the X/Y/Z preset as prompt, infotext and script args.
- ``GET /lora-trainer/v1/unfinished``, ``POST /lora-trainer/v1/resume``: runs that can be resumed; resume one.

Behind the WebUI's ``--api-auth`` when it is set (HTTP basic, as the WebUI's own API).
"""
import logging

log = logging.getLogger(__name__)
PREFIX = "/lora-trainer/v1"


def _auth_dependency():
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic
    from modules import shared
    import secrets
    creds = getattr(shared.cmd_opts, "api_auth", None)
    if not creds:
        return []
    users = dict(c.split(":", 1) for c in creds.strip('"').replace("\n", "").split(",") if ":" in c)
    basic = HTTPBasic()

    def check(credentials=Depends(basic)):  # an HTTPBasicCredentials
        if credentials.username in users and secrets.compare_digest(credentials.password, users[credentials.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def register(_demo, app) -> None:
    from fastapi import Body
    from fastapi.responses import JSONResponse
    from ..config import TrainConfig
    from ..errors import UserError
    from ..service import Busy
    from . import runtime

    deps = _auth_dependency()

    def train(body: dict = Body(...)):
        try:
            cfg = TrainConfig.from_dict(body)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if cfg.unknown:
            return JSONResponse({"error": "unknown config keys: " + ", ".join(sorted(cfg.unknown))}, status_code=400)
        try:
            run_id = runtime.start_training(cfg)
        except Busy as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"run_id": run_id}

    def status():
        return runtime.status()

    def stop():
        return {"stopping": runtime.stop_training(), **runtime.status()}

    def xyz(run_id: str = "", folder: str = "", weights: str = "0.7-1.5 [5]", seeds: bool = False, prompt: str = "",
            width: int = 0, height: int = 0, steps: int = 20):
        try:
            preset = runtime.make_preset(folder=folder or None, run_id=run_id or None, weights=weights,
                                         seeds_variant=seeds, prompt=prompt, width=width or None,
                                         height=height or None, steps=steps)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        d = preset.to_dict()
        d["script_args"] = preset.script_args(runtime.axis_indices())
        d["txt2img_request"] = preset.txt2img_request(runtime.axis_indices())
        return d

    def model_hash():
        """SHA-256 over the loaded model's UNet/TE/VAE tensors and requires_grad flags (taken under the
        generation lock): proof that a run left the model exactly as it found it."""
        from modules import call_queue, shared
        from ..host import model_state_hash
        from ..memory import storage_fingerprint
        with call_queue.queue_lock:
            m = shared.sd_model
            mods = [m.model.diffusion_model, m.cond_stage_model, m.first_stage_model]
            return {"sha256": model_state_hash(mods), "storage": storage_fingerprint(mods)}

    def unfinished():
        """Runs with a training state that did not finish (e.g. the WebUI was restarted mid-run), newest first."""
        return {"runs": runtime.unfinished_runs()}

    def resume(body: dict = Body(...)):
        """Continue an unfinished run from its state: ``{"state": path}`` or ``{"output_name": name}`` (the newest
        state of that name); the run's own config is used, with ``overrides`` (more epochs, a later stop)."""
        try:
            run_id = runtime.resume_run(state=body.get("state") or "", output_name=body.get("output_name") or "",
                                        overrides=body.get("overrides") or {})
        except Busy as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"run_id": run_id}

    app.add_api_route(f"{PREFIX}/unfinished", unfinished, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/resume", resume, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/model-hash", model_hash, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/stop", stop, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/xyz", xyz, methods=["GET"], dependencies=deps)
