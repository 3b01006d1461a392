"""Model loading: every way a user hands mpqc a trained model, each failure as one actionable line.

Accepted MODEL specs: a TorchScript file, a ``torch.export`` file (``.pt2``), a state dict with
``arch="pkg.module:factory"``, ``torchvision:NAME`` (random init, or ``weights=FILE``), and a pickled
``nn.Module`` only with ``trust_pickle=True`` (unpickling runs code from the file).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import io
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass

import torch

from mpqc.errors import UserError, first_line

# default input shapes of torchvision models whose native resolution is not 224
_TORCHVISION_SHAPES = {"inception_v3": (1, 3, 299, 299), "googlenet": (1, 3, 224, 224)}
_DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    """A model ready to capture: the module, example inputs at the input shape, and where it came from."""

    module: torch.nn.Module
    example_inputs: tuple
    source: str

    @property
    def input_shape(self) -> list[int]:
        return list(self.example_inputs[0].shape)


def image_size(shape) -> tuple[int, int] | None:
    """(height, width) of an image model's input shape (N, C, H, W); None for any other shape or none.
    Pictures from an image folder are resized to it, so a 32 x 32 model gets 32 x 32 pictures."""
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) == 4 else None


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """Parse ``"1,3,224,224"`` (also ``1x3x224x224``) into a tuple of positive ints."""
    if text is None:
        return None
    text_ = text.replace(" ", "")
    parts = text_.split(",") if "," in text_ else text_.split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--input-shape {text!r} is not a comma-separated list of integers; "
                        "write it like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input-shape {text!r} must list positive sizes, like 1,3,224,224")
    return shape


def load_model(spec: str, *, arch: str | None = None, weights: str | None = None, trust_pickle: bool = False,
               input_shape: tuple[int, ...] | str | None = None) -> LoadedModel:
    """Load MODEL as described by ``spec`` and build example inputs for capture."""
    if isinstance(input_shape, str):
        input_shape = parse_input_shape(input_shape)
    if spec.startswith("torchvision:"):
        module, default_shape = _load_torchvision(spec.split(":", 1)[1], weights)
        source = spec
    else:
        if weights is not None:
            raise UserError("--weights applies to torchvision:NAME models; for a state dict use MODEL --arch")
        module, default_shape = _load_file(spec, arch=arch, trust_pickle=trust_pickle)
        source = os.path.abspath(spec)
    check_finite(module)
    if input_shape is not None:
        example = (torch.randn(*input_shape),)
    elif hasattr(module, "example_inputs") and callable(module.example_inputs):
        example = tuple(module.example_inputs())
    elif default_shape is not None:
        example = default_shape if isinstance(default_shape, tuple) and isinstance(default_shape[0], torch.Tensor) \
            else (torch.randn(*default_shape),)
    else:
        raise UserError(f"the input shape of {spec} is unknown; pass --input-shape, e.g. --input-shape 1,3,224,224")
    return LoadedModel(set_eval(module), example, source)


def fit_to_data(loaded: LoadedModel, data, spec: str, *, shape_given: bool = False, classifier: bool = True) -> None:
    """Give ``loaded`` example inputs of the data's sample shape and run it once on real samples.

    A data set that does not fit the model otherwise fails much later, inside capture's shape guards or
    calibration, as a traceback; here it is one line naming both shapes. Without an explicit
    ``--input-shape`` (``shape_given``) the data decides the shape, as a user who passes ``--data`` expects;
    with one, a mismatch is the user's to resolve. ``classifier``: the model must return [batch, classes] logits
    covering the data's labels (every method that scores a loss needs that).
    """
    shape = list(data.input_shape[1:])
    model_shape = loaded.input_shape[1:]
    if model_shape != shape:
        if shape_given:
            raise UserError(f"--data {spec}: samples of shape {shape} do not fit --input-shape "
                            f"{','.join(map(str, loaded.input_shape))}; pass a matching --input-shape or other data")
        loaded.example_inputs = (torch.zeros(1, *shape),)
    # The pipeline runs the model on batches of every size (1 for capture, 256 for training, a remainder at the
    # end); a model that runs at one batch size only (a size written into a view, a .pt2 exported with a static
    # batch) would fail there as a shape guard's traceback. Two sizes show it here, and the model's own batch
    # (a .pt2's example) tells a fixed batch from data that does not fit.
    xs = data.val.tensors[0]
    runs = {}
    for n in dict.fromkeys((2, 1, int(loaded.input_shape[0]))):
        if n <= len(xs) and (n in (1, 2) or all(isinstance(r, Exception) for r in runs.values())):
            try:
                with torch.no_grad():
                    runs[n] = loaded.module(xs[:n])
            except Exception as e:  # noqa: BLE001 - whatever the model raises, the cause is the data or the batch
                runs[n] = e
    ok = [n for n, r in runs.items() if not isinstance(r, Exception)]
    if not ok and len(loaded.example_inputs) > 1:
        raise UserError(f"the model takes {len(loaded.example_inputs)} inputs, and --data {spec} feeds one: "
                        "models with several inputs are not supported yet; wrap it in a module that takes one")
    if not ok and any("indices" in str(r) or "embedding" in str(r).lower() for r in runs.values()):
        raise UserError(f"the model takes integer ids (an embedding reads its input), and mpqc feeds every model "
                        f"float inputs, normalised: token models are not supported yet (--data {spec})")
    if not ok:
        raise UserError(f"the data set {spec} does not fit the model's input {model_shape} (samples of shape "
                        f"{shape}: {first_line(runs[2 if 2 in runs else 1])}); use data like the model was "
                        "trained on")
    if len(ok) < len(runs):
        failed = next(n for n, r in runs.items() if isinstance(r, Exception))
        raise UserError(f"the model runs only at batch size {ok[0]} ({failed} sample{'s' * (failed > 1)}: "
                        f"{first_line(runs[failed])}); export it with a dynamic batch (torch.export.export(model, "
                        "(x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))) or save a state dict and pass --arch")
    out = runs[ok[0]]
    if not classifier:
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(f"mpqc scores and evaluates classifiers: the model must return [batch, classes] logits, "
                        f"and it returns {_describe(out)}; {_fix_for(out)}")
    if out.shape[1] < data.num_classes:
        raise UserError(f"--data {spec} has {data.num_classes} classes but the model outputs {out.shape[1]}; "
                        "use matching data or model")


def set_eval(module: torch.nn.Module) -> torch.nn.Module:
    """Put a model in inference mode; an unlifted torch.export module has no train/eval switch and stays as is."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def _describe(out) -> str:
    """What a model returned, in a few words."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(map(repr, list(out)[:4]))}"
    return f"a {type(out).__name__}"


def _fix_for(out) -> str:
    """The change to the model that makes it a plain classifier."""
    if isinstance(out, (tuple, list, dict)):
        return ("wrap it in a module whose forward returns the logits alone (for example the first output, or "
                "out['logits']) and save that, or pass it with --arch")
    return "save a model that ends in its classifier"


def check_finite(module: torch.nn.Module) -> None:
    """Reject models with NaN/Inf weights: every later stage would silently produce garbage."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"parameter {name} contains NaN or Inf values; fix or retrain the model before "
                            "compiling it")


def _load_torchvision(name: str, weights: str | None):
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise UserError(f"unknown torchvision model {name!r}{hint}")
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    module = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights is not None:
        state = _read_state_dict(weights)
        classes = _head_rows(module, state)
        if classes is not None:  # a model fine-tuned for its own classes: build the head it was trained with
            module = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs)
        _load_state(module, state, weights)
    return module, _TORCHVISION_SHAPES.get(name, _DEFAULT_IMAGE_SHAPE)


def _head_rows(module: torch.nn.Module, state: dict) -> int | None:
    """The class count of ``state``'s classifier where it differs from ``module``'s (its last conv or linear
    layer, the one torchvision's ``num_classes`` sizes); None where they agree or the state has no such layer."""
    heads = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not heads:
        return None
    name, head = heads[-1]
    w = {k.removeprefix("module."): v for k, v in state.items()}.get(f"{name}.weight")
    if w is None or w.dim() != head.weight.dim() or w.shape[0] == head.weight.shape[0]:
        return None
    return int(w.shape[0])


def _read_state_dict(path: str) -> dict:
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a plain state dict (it pickles Python objects); save "
                        "model.state_dict() instead") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({first_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _load_state(module: torch.nn.Module, state: dict, path: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        sizes = [ln.strip().rstrip(".") for ln in str(e).splitlines() if "size mismatch for" in ln]
        why = f"{sizes[0]}{f'; {len(sizes) - 1} more' if len(sizes) > 1 else ''}" if sizes else first_line(e)
        raise UserError(f"the weights in {path} do not fit the architecture ({why}); give the architecture they "
                        "were trained with (--arch, or another torchvision:NAME)") from None
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + \
               (f" unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise UserError(f"the weights in {path} do not fit the architecture:{what.rstrip()}; check --arch")


def _require_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"model file {path} not found")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass a model file")
    if os.path.getsize(path) == 0:
        raise UserError(f"model file {path} is empty")


def _refuse_other_formats(path: str) -> None:
    """Files people pass by mistake (a plan, a table, the exported ONNX) are named as what they are, rather than
    called a corrupt checkpoint."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    kind = None
    if head[:1] in (b"{", b"["):
        kind = "a JSON file (a plan, a sensitivity table or a report?)"
    elif path.endswith(".onnx"):
        kind = "an ONNX file"
    elif path.endswith(".toml"):
        kind = "a TOML file (a target or a --config file?)"
    if kind:
        raise UserError(f"{path} is {kind}, not a model: MODEL is a TorchScript, torch.export (.pt2) or "
                        "state-dict file (README, MODEL)")


def _load_file(path: str, *, arch: str | None, trust_pickle: bool):
    _require_file(path)
    is_zip = zipfile.is_zipfile(path)
    names = zipfile.ZipFile(path).namelist() if is_zip else []
    if is_zip and any(n.endswith("constants.pkl") or "/code/" in n for n in names) and \
            not any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        try:
            module = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read TorchScript file {path}: truncated or corrupt ({first_line(e)})") from None
        return module, None
    if path.endswith(".pt2") or any(n.endswith("serialized_exported_program.json") or "/models/" in n
                                    for n in names):
        try:
            ep = torch.export.load(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read torch.export file {path}: truncated or corrupt ({first_line(e)})") from None
        example = ep.example_inputs[0] if getattr(ep, "example_inputs", None) else None
        if example is None:
            shapes = [tuple(n.meta["val"].shape) for n in ep.graph.nodes if n.op == "placeholder"
                      and n.name in ep.graph_signature.user_inputs]
            example = tuple(torch.randn(*s) for s in shapes) if shapes else None
        module = ep.module()
        if example is not None and all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1 for t in example):
            one = tuple(t[:1] for t in example)  # costs are per image (batch 1) where the program allows it
            try:
                with torch.no_grad():
                    module(*one)
                example = one
            except Exception:  # noqa: BLE001 - a static batch: keep the exported shape (fit_to_data names it)
                pass
        return module, tuple(example) if example is not None else None
    if is_zip and not names:
        raise UserError(f"cannot read {path}: the file is truncated or corrupt")
    if not is_zip:
        _refuse_other_formats(path)
    # a torch.save'd object: state dict (needs --arch) or pickled module (needs --trust-pickle)
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices; the outcome is reported below
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a refused class: the bytes are not a valid checkpoint
            raise UserError(f"cannot read {path}: the file is truncated or corrupt ({first_line(e)})") from None
        if not trust_pickle:
            raise UserError(f"{path} is a pickled Python object; unpickling runs code stored in the file, so "
                            "mpqc refuses it by default: pass --trust-pickle if you trust its source, or save "
                            "a state dict (with --arch) or a torch.export file instead") from None
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot unpickle {path} ({first_line(e)}); its classes must be importable") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({first_line(e)})") from None
    if isinstance(obj, torch.nn.Module):
        if arch is not None:
            raise UserError(f"{path} holds a whole module; drop --arch")
        return obj, getattr(obj, "input_shape", None)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise UserError(f"{path} is a state dict; say which architecture it belongs to with "
                            "--arch pkg.module:factory")
        module = _build_arch(arch)
        _load_state(module, obj, path)
        return module, getattr(module, "input_shape", None)
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _build_arch(arch: str) -> torch.nn.Module:
    if ":" not in arch:
        raise UserError(f"--arch {arch!r} must be pkg.module:factory, e.g. torchvision.models:resnet18")
    mod_name, fn_name = arch.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--arch: cannot import module {mod_name!r} ({first_line(e)}); is it on PYTHONPATH?") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise UserError(f"--arch: {mod_name} has no callable {fn_name!r}")
    try:
        module = fn()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--arch: calling {arch}() failed ({first_line(e)}); the factory must take no arguments") \
            from None
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"--arch: {arch}() returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def model_hash(module: torch.nn.Module) -> str:
    """A content hash of the parameters and buffers (names, shapes and values), for caches and manifests."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
