"""ipywidgets explorers. Each wraps a plain plotting function that also works without widgets.

First used in notebooks/01_attention.ipynb. The pattern (CONTRIBUTING.md): the notebook calls the plain
function once for a static figure, then shows the explorer in a cell tagged ``nbval-ignore-output``.
``interactive`` objects can be driven in tests: ``w.children[0].value = ...``.

Also here: ``finish_progress_bars``, which ``make execute`` applies to a saved notebook so that its
``tqdm.auto`` bars read as finished where no kernel renders the widgets (GitHub, nbviewer).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from course_lib.tools.plots import plot_attention
from course_lib.tools.timing import Stopwatch


def show_attention(attentions: Sequence[torch.Tensor], tokens: Sequence[Sequence[str]],
                   layer: int = 0, head: int = 0, sentence: int = 0) -> plt.Axes:
    """Draw the attention map of one (layer, head) for one sentence.

    ``attentions[s]`` has shape (n_layer, n_head, T_s, T_s) for sentence s and ``tokens[s]`` holds its
    T_s tokens (padding already removed).
    """
    if len(attentions) != len(tokens):
        raise ValueError(f"got {len(attentions)} attention tensors but {len(tokens)} token lists; give one "
                         f"(n_layer, n_head, T, T) tensor per sentence.")
    if not 0 <= sentence < len(attentions):
        raise ValueError(f"sentence {sentence} does not exist: there are {len(attentions)} (0..{len(attentions) - 1}).")
    weights = attentions[sentence]
    if weights.dim() != 4:
        raise ValueError(f"attentions[{sentence}] must have shape (n_layer, n_head, T, T), but it has shape "
                         f"{tuple(weights.shape)}; stack the per-layer outputs with torch.stack(...)[:, 0].")
    for what, value, count in (("layer", layer, weights.shape[0]), ("head", head, weights.shape[1])):
        if not 0 <= value < count:
            raise ValueError(f"{what} {value} does not exist: the model has {count} (0..{count - 1}).")
    ax = plot_attention(weights[layer, head], tokens[sentence],
                        title=f"layer {layer}, head {head}: sentence {sentence}")
    plt.show()
    return ax


def attention_explorer(attentions: Sequence[torch.Tensor], tokens: Sequence[Sequence[str]]):
    """Sliders for layer and head and a menu of sentences around :func:`show_attention`."""
    from ipywidgets import Dropdown, IntSlider, interactive

    n_layer, n_head = attentions[0].shape[:2]
    sentences = [(" ".join(t)[:60], i) for i, t in enumerate(tokens)]
    return interactive(
        lambda layer, head, sentence: show_attention(attentions, tokens, layer, head, sentence),
        layer=IntSlider(value=0, min=0, max=n_layer - 1, description="layer"),
        head=IntSlider(value=0, min=0, max=n_head - 1, description="head"),
        sentence=Dropdown(options=sentences, value=0, description="sentence"),
    )


# ------------------------------------------------------------------------------------------------
# Saved notebooks: progress bars that read as finished without a kernel
# ------------------------------------------------------------------------------------------------

_BAR_TEXT = re.compile(r"^.*\d+%\|.*\|")


def _bar_text(state: dict, hbox_id: str) -> str | None:
    """The text a finished ``tqdm.auto`` bar shows, rebuilt from the widget state saved with the notebook."""
    hbox = state.get(hbox_id, {})
    if hbox.get("model_name") != "HBoxModel":
        return None
    parts = [state.get(child.replace("IPY_MODEL_", ""), {}) for child in hbox["state"].get("children", [])]
    if [p.get("model_name") for p in parts] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (p["state"] for p in parts)
    total, done = bar.get("max") or 0, bar.get("value") or 0
    filled = int(round(10 * done / total)) if total else 10
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def finish_progress_bars(notebook: dict) -> int:
    """Replace each ``tqdm.auto`` bar's plain-text fallback ("0%|…", frozen when the bar first appeared)
    by the bar's final text from the saved widget state, so that GitHub and nbviewer show the finished
    bar the run really reached. Returns how many bars were rewritten."""
    state = (notebook.get("metadata", {}).get("widgets", {})
             .get("application/vnd.jupyter.widget-state+json", {}).get("state", {}))
    rewritten = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {})
            view = data.get("application/vnd.jupyter.widget-view+json")
            plain = data.get("text/plain", "")
            plain = "".join(plain) if isinstance(plain, list) else plain
            if not view or not _BAR_TEXT.match(plain):
                continue
            final = _bar_text(state, view.get("model_id", ""))
            if final is not None:
                data["text/plain"] = final
                rewritten += 1
    return rewritten


def unfinished_progress_bars(notebook: dict) -> list[str]:
    """The plain-text fallbacks of saved progress bars that do not read as finished (n == total)."""
    found = []
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            plain = output.get("data", {}).get("text/plain", "")
            plain = "".join(plain) if isinstance(plain, list) else plain
            match = re.search(r"(\d+)%\|.*\|\s*(\d+)/(\d+)", plain)
            if match and match.group(2) != match.group(3):
                found.append(plain.strip()[:80])
            elif not match and re.search(r"\b\d+%\|", plain) and "100%" not in plain:
                found.append(plain.strip()[:80])
    return found


def _output_widget_that_keeps_its_state():
    """nbclient's stand-in for an ipywidgets ``Output`` (what ``interact`` draws into), minus one thing.

    After every output it captures, nbclient's stand-in sends the widget's whole state back to the kernel
    on the shell channel while the cell is still running. Now and then the cell's reply is then never
    seen and the execution hangs with the kernel idle (jupyter/nbconvert#1921, jupyter/nbclient#312; here
    notebook 06's VADER slider hung in 3 of 3 runs on a busy machine, and 1 in 3 of a reduced copy). The
    saved notebook needs the state only on the client side, which nbclient keeps anyway, so this one
    does not send it (6 of 6 reduced copies passed on the same busy machine).
    """
    from nbclient.output_widget import OutputWidget

    class KeepsStateOutputWidget(OutputWidget):
        def sync_state(self) -> None:
            pass

    return KeepsStateOutputWidget


def execute_notebook(path: Path | str, *, timeout: int = 1800) -> None:
    """Run a notebook top to bottom in a fresh ``python3`` kernel (its folder as working directory), mark its
    progress bars finished and save it in place; an error in a cell stops it and nothing is written."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.resolve().parent)}})
    client.widget_registry["@jupyter-widgets/output"]["OutputModel"] = _output_widget_that_keeps_its_state()
    client.execute()
    finish_progress_bars(notebook)
    nbformat.write(notebook, path)


_USAGE = "usage: python -m course_lib.tools.widgets execute|finish-bars NOTEBOOK.ipynb ..."


def _notebook_problem(name: str) -> str | None:
    """Why ``name`` cannot be run or rewritten as a notebook, in one sentence, or None."""
    path = Path(name)
    if not path.is_file():
        return f"{name} does not exist (the lessons are notebooks/NN_name.ipynb)."
    if path.suffix != ".ipynb":
        return f"{name} is not a notebook (.ipynb)."
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return f"{name} is not readable notebook JSON ({error}); restore it with git."
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m course_lib.tools.widgets execute NOTEBOOK...`` (what ``make execute`` runs) and
    ``python -m course_lib.tools.widgets finish-bars NOTEBOOK...``. Every notebook named is checked
    before any runs, so a typo stops with one sentence instead of a traceback or a silent success."""
    import sys

    import nbformat

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("finish-bars", "execute") or len(args) < 2:
        print(_USAGE, file=sys.stderr)
        return 2
    problems = [problem for problem in map(_notebook_problem, args[1:]) if problem]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    if args[0] == "execute":
        for name in args[1:]:
            watch = Stopwatch().start()
            execute_notebook(name)
            print(f"{Path(name).name}: executed and saved in {watch.stop():.0f} s")
        return 0
    for name in args[1:]:
        path = Path(name)
        notebook = nbformat.read(path, as_version=4)
        count = finish_progress_bars(notebook)
        if count:
            nbformat.write(notebook, path)
        print(f"{path.name}: {count} progress bar(s) saved as finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
