"""The examples in README.md and docs/*.md, run as a reader runs them, so that they cannot go stale.

Every fenced block names its language: ``bash`` and ``python`` blocks are examples, ``text``, ``yaml``
and ``json`` blocks are not run. Each example, by its exact text, is in exactly one of three tables:

* ``RUN_AS_WRITTEN``: run as it stands;
* ``SUBSTITUTED``: run after the listed replacements, which keep the command and bound its cost
  (a 10-minute ``minigpt fit`` becomes a few steps of the tiny recipe);
* ``NOT_RUNNABLE``: not run here, with the reason (network, GPUs, tens of minutes, a fixed port).

An example in none of them (or in two) fails `test_every_example_is_classified`, and so does a table
entry that matches no example: a new or edited example is never skipped silently. An example passes
when it exits with status 0, leaves no process running (a server it starts, it stops) and prints what
``OUTPUT_HOLDS`` or the page's ``text`` block after it (``SHOWN_OUTPUT``) says it prints.

The examples of one page run in order, in one folder, as a reader following the page would run
them. That folder starts as a copy of the workspace `workspace` prepares once per module: the README's
``minigpt fit --config tiny`` (``WORKSPACE_RUN``, run there once for every page, not again on its own
page) leaves a tiny trained run at ``lightning_logs/version_0``; beside it lie a small synthetic
``aclImdb_v1.tar.gz`` (also in the data cache, where ``--data.download true`` puts the real one, so
every example's data is prepared in seconds), ``reviews.txt`` and a tiny random GPT-2 folder ``gpt2/``.
HOME, the data cache and the Hugging Face cache are temporary. Pages run in parallel, one process per core,
each process with one core's share of torch threads.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import tiny_reviews, write_corpus, write_tar

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = shlex.quote(str(ROOT / "configs" / "tiny.yaml"))
EXAMPLE_LANGUAGES = ("bash", "python")
OTHER_LANGUAGES = ("text", "yaml", "json")
CPUS = os.cpu_count() or 1
PAGE_WORKERS = max(1, min(4, CPUS))  # pages run at once
TIMEOUT_S = 600  # per example: a hang fails instead of blocking the suite (a busy 2-core machine needs minutes)

# README.md's tiny run: the workspace runs it once, and every page starts from the run it leaves.
WORKSPACE_RUN = "minigpt fit --config tiny"

SERVE_SESSION = """minigpt serve --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --port 0 2> server.log &
server=$!
for _ in $(seq 120); do api=$(grep -o "http://[^ ]*/v1" server.log) && break; sleep 0.5; done
curl -s $api/completions -H "Content-Type: application/json" \\
    -d '{"prompt": "the movie was", "max_tokens": 20, "seed": 1}' && echo
curl -sN $api/chat/completions -H "Content-Type: application/json" \\
    -d '{"messages": [{"role": "user", "content": "was the movie good?"}], "max_tokens": 20, "stream": true}'
kill $server && wait $server"""

RUN_AS_WRITTEN = {
    # README.md
    'minigpt generate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --prompt "the movie was"\n'
    "minigpt evaluate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt",
    "minigpt --version",
    WORKSPACE_RUN,
    """import torch

from minigpt import GPT, GPTConfig, SamplingConfig, generate_text, load_model

model, tokenizer = load_model("lightning_logs/version_0/checkpoints/last.ckpt")
sampling = SamplingConfig(max_new_tokens=30, temperature=0.8, top_k=50)
print(generate_text(model, tokenizer, "the movie was", sampling, generator=torch.Generator().manual_seed(0)))

config = GPTConfig(vocab_size=1000, block_size=64, n_embd=128, n_layer=2, n_head=4, norm_first=True)
logits = GPT(config)(torch.randint(0, 1000, (2, 64)))  # (batch, time, vocab_size)""",
    # docs/data.md
    "minigpt prepare --data.source bundled",
    "minigpt prepare --data.source text --data.text_path reviews.txt --show 2",
    # docs/generation.md
    'minigpt generate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --prompt "the movie was" \\\n'
    "    --num_samples 3 --max_new_tokens 40 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0\n"
    "printf 'the movie was\\nthe acting\\n' | minigpt generate \\\n"
    "    --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --prompt_file - --json",
    """import torch

from minigpt.checkpoint import load_model
from minigpt.generation import SamplingConfig, generate, generate_text

model, tokenizer = load_model("lightning_logs/version_0/checkpoints/last.ckpt")
sampling = SamplingConfig(max_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95)
prompt = "the movie was"
text = generate_text(model, tokenizer, prompt, sampling, generator=torch.Generator().manual_seed(0))
print(prompt, text)  # generate_text returns the continuation only

(result,) = generate(model, tokenizer.encode(prompt), SamplingConfig.greedy(10), stop_ids=[tokenizer.eot_index])
print(prompt, tokenizer.decode(result.tokens, tidy=True), result.stop_reason)  # "eos" or "length" (max_new_tokens)""",
    "minigpt evaluate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --text_file reviews.txt --json",
    # docs/huggingface.md: the workspace's run exported, compared and read back, then loaded with transformers
    "minigpt convert --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --to_hf imdb-gpt\n"
    "minigpt compare --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --hf_model imdb-gpt "
    "--text_file reviews.txt\n"
    "minigpt convert --from_hf imdb-gpt --out imdb-gpt.ckpt",
    """import minigpt  # noqa: F401  (registers model_type "minigpt" with transformers' Auto classes)
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("imdb-gpt")
tokenizer = AutoTokenizer.from_pretrained("imdb-gpt")
generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(generate("the movie was", max_new_tokens=20)[0]["generated_text"])""",
    """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("imdb-gpt", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("imdb-gpt", trust_remote_code=True)
inputs = tokenizer(["the movie was", "it"], return_tensors="pt", padding=True, padding_side="left")
outputs = model.generate(**inputs, do_sample=False, max_new_tokens=20)  # greedy
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))""",
    # docs/huggingface.md (after the fine-tuning example above it on the page)
    "minigpt convert --ckpt_path gpt2-imdb/lightning_logs/version_0/checkpoints/last.ckpt --to_hf gpt2-imdb/hf",
    # docs/serving.md: a server on a free port, two requests, stopped by the example
    SERVE_SESSION,
    # docs/results.md
    'minigpt generate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --prompt "the movie was" \\\n'
    "    --num_samples 5 --max_new_tokens 40 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0",
    # docs/training.md
    "minigpt test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt",
    "minigpt plot lightning_logs/version_0 --out losses.png",
}

# example -> (old, new) replacements; each `old` must occur in the example.
SUBSTITUTED = {
    # README.md: training for an hour, then resuming the newest run
    "minigpt fit --trainer.max_time 00:01:00:00    # one hour instead of 10 minutes\n"
    "minigpt fit --ckpt_path last                  # the newest run, exactly where it stopped": [
        (
            "minigpt fit --trainer.max_time 00:01:00:00",
            f"minigpt fit --config {TINY} --trainer.max_time 00:01:00:00 --trainer.max_steps 3",
        ),
        ("minigpt fit --ckpt_path last", f"minigpt fit --config {TINY} --ckpt_path last --trainer.max_steps 6"),
    ],  # fmt: skip
    # docs/training.md
    "minigpt fit --trainer.max_time null --trainer.max_epochs 20": [
        ("--trainer.max_epochs 20", f"--trainer.max_epochs 20 --config {TINY} --trainer.max_steps 3"),
    ],
    # docs/results.md
    "minigpt fit --data.archive aclImdb_v1.tar.gz --seed_everything 42\n"
    "minigpt evaluate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --split test": [
        ("minigpt fit --data", f"minigpt fit --config {TINY} --data"),
        ("--seed_everything 42", "--seed_everything 42 --trainer.max_steps 3"),
    ],
    "minigpt fit --data.archive aclImdb_v1.tar.gz --seed_everything 42 --trainer.max_time null "
    "--trainer.max_steps 1500\n"
    "minigpt evaluate --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --split val --max_docs 1000": [
        ("minigpt fit --data", f"minigpt fit --config {TINY} --data"),
        ("--trainer.max_steps 1500", "--trainer.max_steps 3"),
    ],
    # docs/huggingface.md: the tiny GPT-2 of the workspace, two steps of fine-tuning
    "minigpt convert --from_hf gpt2 --out gpt2.ckpt\n"
    'minigpt compare --ckpt_path gpt2.ckpt --hf_model gpt2 --prompt "the movie was" --text_file reviews.txt\n'
    "minigpt fit --model.init_from gpt2.ckpt --data.block_size 128 --model.optimizer adamw --model.lr 5e-5 \\\n"
    "    --model.scheduler constant --trainer.default_root_dir gpt2-imdb": [
        ("--trainer.default_root_dir gpt2-imdb", "--trainer.default_root_dir gpt2-imdb --trainer.max_steps 2"),
    ],
}

NOT_RUNNABLE = {
    # README.md
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[dev]\" && "
    "minigpt fit": "installs from the package index (network), then trains for 10 minutes; .ci/run installs the "
    "same way",
    ". .venv/bin/activate && python -m pytest -q": "runs this test suite, this file included",
    # docs/data.md
    "minigpt prepare --data.download true": "downloads aclImdb_v1.tar.gz from Stanford (network)",
    # docs/results.md
    "python scripts/quality_vs_minutes.py --archive aclImdb_v1.tar.gz --recipes imdb --minutes 1 2 5 10 30 "
    "--seeds 42": "about an hour of training on the official archive",
    "python scripts/quality_vs_minutes.py --archive aclImdb_v1.tar.gz": "hours of training on the official "
    "archive",
    # docs/benchmarks.md
    "python scripts/bench_train.py --json\npython scripts/bench_generate.py --json\n"
    "python scripts/bench_data.py --scale 20\npython scripts/bench_cli.py": "over 10 minutes of timing on a quiet "
    "machine (tests/test_kernels.py and tests/test_generation.py run the first two at tiny sizes)",
    # docs/huggingface.md
    "hf download openai-community/gpt2 config.json model.safetensors tokenizer.json tokenizer_config.json "
    "--local-dir gpt2": "downloads GPT-2 from the Hugging Face Hub (network)",
    # docs/scaling.md
    "minigpt fit --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp": "two training processes, "
    "beyond this file's time budget; tests/test_reliability.py trains and resumes with these options",
    "minigpt fit --trainer.accelerator gpu --trainer.devices 8 --trainer.strategy ddp\n"
    "minigpt fit --trainer.accelerator gpu --trainer.devices 8 --trainer.num_nodes 4 --trainer.strategy ddp\n"
    "minigpt fit --trainer.devices 8 --trainer.strategy fsdp --trainer.precision bf16-mixed --model.optimizer adamw":
    "needs 8 GPUs, and 4 nodes for the second line",
    # docs/serving.md
    'pip install -e ".[serve]"': "installs from the package index (network); the dev extra the tests run with "
    "holds the same packages",
    """from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-without---api_key")

reply = client.completions.create(model="minigpt", prompt="the movie was", max_tokens=30, seed=1)
print(reply.choices[0].text, reply.choices[0].finish_reason, reply.usage)

for chunk in client.completions.create(model="minigpt", prompt="the acting", max_tokens=30, stream=True,
                                       extra_body={"top_k": 20}):
    print(chunk.choices[0].text, end="", flush=True)
print()

chat = client.chat.completions.create(
    model="minigpt", messages=[{"role": "user", "content": "was the movie good?"}], max_tokens=30
)
print(chat.choices[0].message.content)""": "talks to a server on port 8000, which a test cannot count on being "
    "free; tests/test_serve.py makes these calls with the openai client against a server on a free port",
    "python scripts/bench_serve.py --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt": "minutes of load "
    "(1, 4 and 16 streaming clients against two servers, then a 1,000-request soak)",
}  # fmt: skip

# Examples whose output must hold these strings (what the page says it prints). A curl that gets an
# HTTP error still exits with status 0, so the server session is checked by what it printed.
OUTPUT_HOLDS = {
    SERVE_SESSION: ('"object":"text_completion"', '"object": "chat.completion.chunk"', "data: [DONE]"),
}

# Examples whose output the page shows in the ```text block right after them: each shown line must
# be a line of the output, except lines starting with these words (timings, the cache path).
SHOWN_OUTPUT = {"minigpt prepare --data.source bundled": ("seconds", "built")}

# Development-log wording: the docs are reference for a stranger, not a history of how they came to be.
DEVELOPMENT_LOG = [
    r"\bround \d",
    r"\breleas(e|es|ed)\b",
    r"\bissues?\b",
    r"\bprevious recipe\b",
    r"\bnot kept\b",
    r"\bgoals?\b",
    r"\bnot met\b",
    r"\bnone was lent\b",
    r"\bthis machine has on disk\b",
    r"\.\./shared",
    r"/work/",
]


@dataclass(frozen=True)
class Fence:
    page: str
    line: int
    language: str
    text: str
    shown: str | None  # the ```text block right after it, if any

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def fences(path: Path) -> list[Fence]:
    """Every fenced block of a Markdown page, with the ```text block that follows it, if any."""
    page = str(path.relative_to(ROOT))
    text = path.read_text(encoding="utf-8")
    found = list(re.finditer(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", text, re.M | re.S))
    blocks = []
    for i, m in enumerate(found):
        line = text[: m.start()].count("\n") + 1
        after = found[i + 1] if i + 1 < len(found) else None
        shown = None
        if after is not None and after.group(1) == "text" and not text[m.end() : after.start()].strip():
            shown = after.group(2)
        body = "\n".join(row.rstrip() for row in m.group(2).strip("\n").splitlines())
        blocks.append(Fence(page, line, m.group(1), body, shown))
    return blocks


ALL_FENCES = [f for page in PAGES for f in fences(page)]
EXAMPLES = [f for f in ALL_FENCES if f.language in EXAMPLE_LANGUAGES]
RUNNABLE = [f for f in EXAMPLES if f.text in RUN_AS_WRITTEN or f.text in SUBSTITUTED]


def runnable_text(example: Fence) -> str:
    text = example.text
    for old, new in SUBSTITUTED.get(example.text, []):
        assert old in text, f"{example.id}: the substitution {old!r} no longer matches the example"
        text = text.replace(old, new)
    return text


def _run(example: Fence, folder: Path, env: dict) -> subprocess.CompletedProcess | str:
    """Run one example in `folder`: its result, or why it failed to finish.

    It runs in a session of its own, so that whatever it leaves running (a server it did not stop) is
    found, stopped and reported, as is a hang. Output goes to files, which a leftover process cannot hold open.
    """
    text = runnable_text(example)
    command = ["bash", "-euo", "pipefail", "-c", text] if example.language == "bash" else [sys.executable, "-c", text]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            process.wait(timeout=TIMEOUT_S)
            failure = None
        except subprocess.TimeoutExpired:
            failure = f"did not finish within {TIMEOUT_S} s"
        try:
            os.killpg(process.pid, signal.SIGKILL)
            failure = failure or "exited but left processes running (stopped now); an example stops what it starts"
        except ProcessLookupError:
            pass  # nothing of its session is left
        process.wait()
        if failure:
            return failure
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def _example(text: str) -> Fence:
    found = [e for e in EXAMPLES if e.text == text]
    assert found, f"no page has the example {text!r} any more"
    return found[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """The folder each page's examples start from, and the environment they run in (see the module docstring)."""
    top = tmp_path_factory.mktemp("docs_examples")
    project, cache = top / "project", top / "cache"
    for folder in (project, cache, top / "home", top / "hf_home"):
        folder.mkdir()
    write_tar(cache / "aclImdb_v1.tar.gz", tiny_reviews(30))
    shutil.copy(cache / "aclImdb_v1.tar.gz", project / "aclImdb_v1.tar.gz")
    write_corpus(project / "reviews.txt")
    env = {
        **os.environ,
        "HOME": str(top / "home"),
        "MINIGPT_CACHE": str(cache),
        "HF_HOME": str(top / "hf_home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # torch's threads per process: its default (one per core) in every one of the pages running at once
        # oversubscribes the cores, and the tiny models' many small operations then wait on each other's
        # threads (on a busy 2-core machine a tiny model's generation took 3 to 8 times as long).
        "OMP_NUM_THREADS": str(max(1, CPUS // PAGE_WORKERS)),
    }
    env.pop("MINIGPT_DEBUG", None)
    first = _example(WORKSPACE_RUN)
    with ThreadPoolExecutor(max_workers=1) as pool:
        fit = pool.submit(_run, first, project, env)
        # Built while the run trains: importing test_hf (and with it Lightning and transformers) takes seconds.
        import transformers
        from test_hf import EOT, _tiny_gpt2, _train_bpe

        tok = _train_bpe()
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)
        fast.save_pretrained(project / "gpt2")
        _tiny_gpt2(tok.get_vocab_size(), tok.token_to_id(EOT), n_positions=128).save_pretrained(project / "gpt2")
        result = fit.result()
    assert not isinstance(result, str) and result.returncode == 0, f"the workspace's tiny run failed: {result}"
    assert (project / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()
    return {"top": top, "project": project, "env": env, "done": {first.id: result}}


def _run_page(page: str, examples: list[Fence], workspace: dict) -> dict[str, subprocess.CompletedProcess | str]:
    folder = workspace["top"] / "pages" / page.replace("/", "_")
    shutil.copytree(workspace["project"], folder)
    done = workspace["done"]  # the workspace's own run stands for that example: its folder already holds the run
    return {e.id: done[e.id] if e.id in done else _run(e, folder, workspace["env"]) for e in examples}


@pytest.fixture(scope="module")
def page_runs(workspace, request) -> dict[str, Future]:
    """Each page with a selected example runs in a thread of its own (its examples in order, in subprocesses)."""
    selected = {
        item.callspec.params["example"].page
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs" and hasattr(item, "callspec")
    }
    pool = ThreadPoolExecutor(max_workers=PAGE_WORKERS)
    request.addfinalizer(lambda: pool.shutdown(wait=True))
    by_page: dict[str, list[Fence]] = {}
    for example in RUNNABLE:
        if example.page in selected:
            by_page.setdefault(example.page, []).append(example)
    # The pages with the most commands first, so that the last one to finish is a short one.
    order = sorted(by_page, key=lambda page: -sum(runnable_text(e).count("\n") + 1 for e in by_page[page]))
    return {page: pool.submit(_run_page, page, by_page[page], workspace) for page in order}


def test_every_fence_names_a_language_we_know():
    unknown = [f"{f.id} ```{f.language}" for f in ALL_FENCES if f.language not in EXAMPLE_LANGUAGES + OTHER_LANGUAGES]
    assert not unknown, f"fences must be one of {EXAMPLE_LANGUAGES + OTHER_LANGUAGES}: {unknown}"


def test_every_example_is_classified():
    tables = {"RUN_AS_WRITTEN": RUN_AS_WRITTEN, "SUBSTITUTED": SUBSTITUTED, "NOT_RUNNABLE": NOT_RUNNABLE}
    for example in EXAMPLES:
        listed = [name for name, table in tables.items() if example.text in table]
        assert len(listed) == 1, (
            f"{example.id}: this example is in {listed or 'none'} of RUN_AS_WRITTEN, SUBSTITUTED, NOT_RUNNABLE "
            f"(tests/test_docs.py); put its exact text in one of them:\n{example.text}"
        )
    texts = {e.text for e in EXAMPLES}
    for name, table in tables.items():
        stale = [key for key in table if key not in texts]
        assert not stale, f"{name} lists examples that no page has any more: {stale}"
    assert all(reason.strip() for reason in NOT_RUNNABLE.values())
    assert all(SUBSTITUTED.values()), "a substitution lists its replacements"


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.id for e in RUNNABLE])
def test_example_runs(example: Fence, page_runs):
    result = page_runs[example.page].result()[example.id]
    assert not isinstance(result, str), f"{example.id} {result}:\n{example.text}"
    assert result.returncode == 0, (
        f"{example.id} exited with {result.returncode}:\n{runnable_text(example)}\n"
        f"--- stdout ---\n{result.stdout[-2000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )
    for expected in OUTPUT_HOLDS.get(example.text, ()):
        assert expected in result.stdout, f"{example.id} no longer prints {expected!r}; it prints:\n{result.stdout}"
    varying = SHOWN_OUTPUT.get(example.text)
    if varying is not None:
        assert example.shown is not None, f"{example.id}: the page no longer shows this example's output"
        printed = {line.rstrip() for line in result.stdout.splitlines()}
        for line in example.shown.splitlines():
            if line.split(" ", 1)[0] in varying:
                assert any(p.startswith(line.split(" ", 1)[0]) for p in printed), f"{example.id}: no {line!r}"
            else:
                assert line.rstrip() in printed, f"{example.id} no longer prints {line!r}; it prints:\n{result.stdout}"


def test_shown_outputs_are_checked():
    """A page that shows an example's output shows what the command prints (see SHOWN_OUTPUT)."""
    runnable_with_output = {e.text for e in RUNNABLE if e.shown is not None}
    assert set(SHOWN_OUTPUT) <= runnable_with_output, "SHOWN_OUTPUT lists an example without a shown output"


def test_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move reference material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_development_log_words(page: Path):
    text = page.read_text(encoding="utf-8")
    found = [m.group(0) for pattern in DEVELOPMENT_LOG for m in re.finditer(pattern, text, re.I)]
    assert not found, f"{page.name} reads as a development log or names paths outside the project: {found}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_named_files_exist(page: Path):
    """Relative links, and files of the project named in backquotes (`minigpt/...`, `scripts/...`, ...)."""
    text = page.read_text(encoding="utf-8")
    links = [t for t in re.findall(r"\]\(([^)\s#]+)", text) if "://" not in t]
    missing = [t for t in links if not (page.parent / t).exists()]
    named = re.findall(r"`((?:minigpt|scripts|tests|configs|docs|examples)/[\w./-]*)`", text)
    missing += [n for n in named if not (ROOT / n).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_states_the_torch_floor_of_pyproject():
    floor = re.search(r'"torch>=([\d.]+)', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert floor, "pyproject.toml declares no torch floor"
    wording = f"torch {floor[1]} or newer"
    assert wording in (ROOT / "README.md").read_text(encoding="utf-8"), f"README.md must say {wording!r}"


def test_readme_states_the_default_recipes_budget():
    max_time = yaml.safe_load((ROOT / "configs" / "imdb.yaml").read_text(encoding="utf-8"))["trainer"].get("max_time")
    assert max_time, "configs/imdb.yaml sets no trainer.max_time: `minigpt fit` would not end by itself"
    if isinstance(max_time, dict):  # Lightning takes timedelta's keywords too
        budget = timedelta(**max_time)
    else:  # or its "DD:HH:MM:SS"
        days, hours, minutes, seconds = (int(part) for part in str(max_time).split(":"))
        budget = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    minutes = budget.total_seconds() / 60
    assert minutes.is_integer(), f"the README speaks of whole minutes; imdb.yaml trains for {budget}"
    assert f"for **{minutes:.0f} minutes**" in (ROOT / "README.md").read_text(encoding="utf-8")
