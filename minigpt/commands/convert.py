"""``minigpt convert``: a Hugging Face GPT-2 folder -> a minigpt checkpoint, or back."""

from __future__ import annotations

from minigpt.errors import UserError


def convert(
    from_hf: str | None = None,
    out: str | None = None,
    ckpt_path: str | None = None,
    to_hf: str | None = None,
    overwrite: bool = False,
) -> None:
    """Convert between a Hugging Face GPT-2 folder and a minigpt checkpoint.

    Use either ``--from_hf DIR --out CKPT`` or ``--ckpt_path CKPT --to_hf DIR``.

    Args:
        from_hf: a local Hugging Face GPT-2 folder (config, weights, tokenizer).
        out: with --from_hf: the minigpt checkpoint to write.
        ckpt_path: with --to_hf: the minigpt checkpoint to export.
        to_hf: with --ckpt_path: the folder to write.
        overwrite: replace an existing output.
    """
    if from_hf and out and not (ckpt_path or to_hf):
        from minigpt.convert import convert_from_hf  # transformers: imported only here

        print(convert_from_hf(from_hf, out, overwrite=overwrite))
    elif ckpt_path and to_hf and not (from_hf or out):
        from minigpt.convert import convert_to_hf

        print(convert_to_hf(ckpt_path, to_hf, overwrite=overwrite))
    else:
        raise UserError("use either --from_hf DIR --out CKPT or --ckpt_path CKPT --to_hf DIR")
