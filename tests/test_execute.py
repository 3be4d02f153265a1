"""`make execute` (course_lib.tools.widgets.execute_notebook): a notebook with an `interact` slider runs through,
saves its widget's output on the client side, and never sends widget state back to the kernel mid-cell
(the race that hung notebook 06 under nbclient's stock Output stand-in)."""
from __future__ import annotations

import nbformat
import pytest

from course_lib.tools import widgets


class FakeKernelClient:
    def __init__(self):
        self.sent = []
        self.session = self
        self.shell_channel = self

    def msg(self, *args, **kwargs):
        return {"args": args, "kwargs": kwargs}

    def send(self, message):
        self.sent.append(message)


class FakeExecutor:
    def __init__(self):
        self.widget_state = {"w": {}}


def _stream_msg(text):
    return {"msg_type": "stream", "parent_header": {"msg_id": "p"}, "header": {"msg_type": "stream"},
            "content": {"name": "stdout", "text": text}}


def test_the_output_stand_in_keeps_outputs_without_sending_them_to_the_kernel():
    from nbclient.output_widget import OutputWidget

    kernel, executor = FakeKernelClient(), FakeExecutor()
    ours = widgets._output_widget_that_keeps_its_state()("w", {"outputs": []}, kernel, executor)
    ours.output([], _stream_msg("hello\n"), None, 0)
    assert kernel.sent == [] and executor.widget_state["w"]["outputs"][0]["text"] == "hello\n"
    stock = OutputWidget("w", {"outputs": []}, kernel, executor)      # what we replace does send, mid-cell
    stock.output([], _stream_msg("hello\n"), None, 0)
    assert len(kernel.sent) == 1


@pytest.mark.slow
def test_execute_saves_an_interact_cell_and_its_widget_state(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
                                  "import matplotlib.pyplot as plt\nfrom ipywidgets import interact, FloatSlider\n"
                                  "def draw(t=0.0):\n    plt.plot([0, t]); plt.title(f't = {t}'); plt.show()\n"
                                  "draw(0.5)"),
        nbformat.v4.new_code_cell("interact(draw, t=FloatSlider(value=0.25, min=0, max=1));"),
        nbformat.v4.new_code_cell("print('after the slider')"),
    ]
    path = tmp_path / "slider.ipynb"
    nbformat.write(notebook, path)
    widgets.execute_notebook(path, timeout=120)
    saved = nbformat.read(path, as_version=4)
    assert saved.cells[2].outputs[0]["text"] == "after the slider\n"
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    drawn = [m for m in state.values() if m["model_name"] == "OutputModel" and m["state"].get("outputs")]
    assert drawn and "image/png" in drawn[0]["state"]["outputs"][0]["data"]
