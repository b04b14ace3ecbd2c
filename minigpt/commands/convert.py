"""``minigpt convert``: a minigpt checkpoint -> a Hugging Face model folder, or such a folder (or GPT-2) back."""

from __future__ import annotations

from minigpt.errors import UserError


def convert(
    from_hf: str | None = None,
    out: str | None = None,
    ckpt_path: str | None = None,
    to_hf: str | None = None,
    dtype: str = "float32",
    license: str = "mit",
    overwrite: bool = False,
) -> None:
    """Convert between a minigpt checkpoint and a Hugging Face model folder.

    Use either ``--ckpt_path CKPT --to_hf DIR`` (any minigpt model: GPT-2-equivalent ones as GPT-2, the
    others as minigpt's architecture with its code in DIR) or ``--from_hf DIR --out CKPT`` (such a folder,
    or a Hugging Face GPT-2).

    Args:
        from_hf: a local Hugging Face folder (config, weights, tokenizer).
        out: with --from_hf: the minigpt checkpoint to write.
        ckpt_path: with --to_hf: the minigpt checkpoint to export.
        to_hf: with --ckpt_path: the folder to write (config, weights, tokenizer, generation settings, model card).
        dtype: with --to_hf: float32 or bfloat16 weights.
        license: with --to_hf: the license the model card declares for the weights.
        overwrite: replace an existing output.
    """
    if from_hf and out and not (ckpt_path or to_hf):
        from minigpt.convert import convert_from_hf  # transformers: imported only here

        print(convert_from_hf(from_hf, out, overwrite=overwrite))
    elif ckpt_path and to_hf and not (from_hf or out):
        from minigpt.convert import convert_to_hf

        print(convert_to_hf(ckpt_path, to_hf, overwrite=overwrite, dtype=dtype, license=license))
    else:
        raise UserError("use either --from_hf DIR --out CKPT or --ckpt_path CKPT --to_hf DIR")
