"""minigpt's own commands, one module each: a typed function of the same name that `minigpt.cli`
parses with jsonargparse (its signature and docstring are the command's options and help).

`train` holds Lightning's fit/validate/test. Only `train`, `prepare` and `plot` import Lightning;
`generate` and `evaluate` need torch and minigpt's pure layers only.
"""
