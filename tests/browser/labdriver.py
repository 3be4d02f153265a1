"""Drive a real JupyterLab in headless Chromium (used by test_jupyterlab_browser.py).

``LabServer`` starts ``jupyter lab`` the way ``make lab`` does (this environment's Jupyter, the
course kernel it has registered, a notebook folder as root) but on a free loopback port, with a
token, and with its own temporary Jupyter config, data, runtime and IPython folders, so nothing of
the user's is read or written. ``Notebook`` opens one notebook in a Playwright page and does what a
student does: wait for the kernel, Run > Run All Cells, look at the outputs, move a slider.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

WIDGET_EXTENSION = "@jupyter-widgets/jupyterlab-manager"
UNDER_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``; under CI (the ``CI`` environment variable set) fail with it
    instead: there the browser test must run, never skip."""
    import pytest

    if UNDER_CI:
        pytest.fail(f"{reason} (the CI environment variable is set, so the browser test must run, not skip)",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GiveUp(Exception):
    """Raised by a ``wait_for`` predicate when waiting longer cannot help."""


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except GiveUp as error:
            raise AssertionError(f"gave up waiting for {what}: {error}") from None
        except Exception as error:  # noqa: BLE001 -- keep polling, report the last one
            last_error = error
        else:
            if value:
                return value
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


class LabServer:
    """``jupyter lab`` on ``root`` in an isolated Jupyter home; use as a context manager."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None, startup_timeout: float = 90.0,
                 keep_log: Path | None = None):
        self.root = Path(root)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.home = Path(tempfile.mkdtemp(prefix="lab-home-"))
        self.config_dir = self.home / "config"
        self.log_path = self.home / "jupyter-lab.log"
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.keep_log = keep_log  # where the server's log is copied when it stops
        self.process: subprocess.Popen | None = None
        self._log = None

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> "LabServer":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        for sub in ("config", "data", "runtime", "ipython"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        # The user's own settings must not leak in (nor be written to): the test's settings change
        # only the one thing a test needs, autosave, so the notebook files stay as they are.
        user_settings = self.config_dir / "lab" / "user-settings" / "@jupyterlab" / "docmanager-extension"
        user_settings.mkdir(parents=True, exist_ok=True)
        (user_settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
        env = dict(os.environ)
        env.update({
            "JUPYTER_CONFIG_DIR": str(self.config_dir),
            "JUPYTER_DATA_DIR": str(self.home / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
            "IPYTHONDIR": str(self.home / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "0",
        })
        for key in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_TOKEN"):
            env.pop(key, None)
        env.update(self.extra_env)
        command = [
            sys.executable, "-m", "jupyter", "lab",
            f"--notebook-dir={self.root}",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            # Lets the test read the notebook model (outputs, kernel) from the page; changes nothing
            # a user would see.
            "--LabApp.expose_app_in_browser=True",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")  # containers and CI runners often run as root
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._answers, timeout=self.startup_timeout, interval=0.5,
                     what=f"jupyter lab to answer GET /api/status on port {self.port}")
        except AssertionError as error:
            log = self.log()
            self.stop()
            raise AssertionError(f"{error}\n--- jupyter lab log ---\n{log}") from None

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise GiveUp(f"jupyter lab exited with code {self.process.returncode}")
        return self.api("status") is not None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the server shuts its kernels down
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.keep_log is not None and self.log_path.exists():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, self.keep_log)
        shutil.rmtree(self.home, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return "(no log)"

    # -- REST ------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.base_url}/api/{path}",
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def lab_api(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.base_url}/lab/api/{path}",
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def session_for(self, notebook: str) -> dict | None:
        for session in self.api("sessions"):
            if session.get("path") == notebook or session.get("notebook", {}).get("path") == notebook:
                return session
        return None

    def lab_url(self, notebook: str) -> str:
        # ``reset``: start from an empty workspace, not with the tabs an earlier page left open.
        return f"{self.base_url}/lab/tree/{notebook}?token={self.token}&reset"

    # -- page config -----------------------------------------------------------------------------
    def disable_extensions(self, *names: str) -> Path:
        """Disable lab extensions for pages loaded from now on (the isolated config's page_config.json,
        what ``jupyter labextension disable`` writes); the shared environment is not touched."""
        path = self.config_dir / "labconfig" / "page_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"disabledExtensions": {name: True for name in names}}))
        return path

    def enable_all_extensions(self) -> None:
        (self.config_dir / "labconfig" / "page_config.json").unlink(missing_ok=True)


class Notebook:
    """One notebook open in JupyterLab in a Playwright ``page``."""

    def __init__(self, page: Any, server: LabServer, path: str):
        self.page = page
        self.server = server
        self.path = path
        self.panel = ".jp-NotebookPanel"  # narrowed to this notebook's panel by open()

    def open(self, *, timeout: float = 60.0) -> "Notebook":
        self.page.goto(self.server.lab_url(self.path), wait_until="domcontentloaded")
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout * 1000)
        self.page.wait_for_function("() => window.jupyterapp !== undefined", timeout=timeout * 1000)
        panel_id = self.page.wait_for_function(
            """path => { const w = window.jupyterapp.shell.currentWidget;
                        return w && w.context && w.context.path === path ? w.id : null; }""",
            arg=self.path, timeout=timeout * 1000).json_value()
        self.panel = f'.jp-NotebookPanel[id="{panel_id}"]'
        self.wait_kernel_idle(timeout=timeout)
        return self

    # -- state -----------------------------------------------------------------------------------
    def dialog_text(self) -> str | None:
        dialog = self.page.locator(".jp-Dialog")
        return dialog.first.inner_text() if dialog.count() else None

    def wait_kernel_idle(self, *, timeout: float) -> dict:
        """Wait until the notebook's kernel session exists and is idle; a kernel dialog (JupyterLab could
        not decide which kernel to start) fails at once, with the dialog's text."""
        def idle() -> dict | None:
            text = self.dialog_text()
            if text:
                raise GiveUp(f"JupyterLab shows a dialog instead of starting a kernel: {text!r}")
            session = self.server.session_for(self.path)
            if session and session.get("kernel", {}).get("execution_state") == "idle":
                return session
            return None

        return wait_for(idle, timeout=timeout, what=f"a kernel for {self.path} to start and go idle")

    def kernel_display_name(self) -> str:
        """The kernel name shown in the notebook's toolbar."""
        return self.page.locator(f"{self.panel} .jp-NotebookPanel-toolbar .jp-KernelName").first.inner_text().strip()

    def model(self) -> dict:
        """The notebook as JupyterLab holds it now (nbformat JSON, outputs included)."""
        return self.page.evaluate("""path => {
            const widget = window.jupyterapp.shell.currentWidget;
            if (!widget || !widget.context || widget.context.path !== path) {
                throw new Error(`the current tab is not ${path}`);
            }
            return widget.content.model.toJSON();
        }""", self.path)

    def prompts(self) -> list[str]:
        return self.page.evaluate("""panel => Array.from(
            document.querySelectorAll(`${panel} .jp-CodeCell .jp-InputArea-prompt`),
            el => el.textContent.trim())""", self.panel)

    # -- actions ---------------------------------------------------------------------------------
    def clear_outputs(self) -> None:
        """Clear every output and execution count, so what is seen afterwards comes from this run."""
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
        wait_for(lambda: not any(re.match(r"^\[(\d+|\*)\]", p) for p in self.prompts()), timeout=10,
                 what="the stored outputs to be cleared")

    def run_all(self) -> None:
        """Clear the stored outputs, then Run > Run All Cells through the menu bar as a student would."""
        self.clear_outputs()
        self.page.locator(f"{self.panel} .jp-Notebook").first.click(position={"x": 5, "y": 5})
        self.page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        self.page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).first.click()

    def wait_run_finished(self, *, timeout: float) -> None:
        """Wait until no cell shows ``[*]`` and the kernel has been idle for a moment."""
        started = time.monotonic()
        wait_for(lambda: any(re.match(r"^\[(\d+|\*)\]", p) for p in self.prompts()),
                 timeout=min(timeout, 30), what="Run All to start (no cell shows [*] or a number)")

        quiet_since: list[float] = []

        def finished() -> bool:
            busy = any(p.startswith("[*]") for p in self.prompts())
            session = self.server.session_for(self.path)
            idle = bool(session) and session["kernel"].get("execution_state") == "idle"
            if busy or not idle:
                quiet_since.clear()
                return False
            if not quiet_since:
                quiet_since.append(time.monotonic())
            return time.monotonic() - quiet_since[0] > 1.0

        try:
            wait_for(finished, timeout=max(1.0, timeout - (time.monotonic() - started)), interval=0.3,
                     what=f"Run All of {self.path} to finish")
        except AssertionError as error:
            raise AssertionError(f"{error}; the prompts read {self.prompts()}") from None

    def cell(self, index: int) -> Any:
        """The DOM node of cell ``index`` (all cells count, markdown too)."""
        return self.page.locator(f"{self.panel} .jp-Notebook .jp-Cell").nth(index)

    def scroll_to(self, index: int) -> Any:
        cell = self.cell(index)
        cell.scroll_into_view_if_needed()
        return cell

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


def error_outputs(cell: dict) -> list[dict]:
    return [out for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def describe_error(output: dict) -> str:
    return f"{output.get('ename')}: {output.get('evalue')}"


def cell_tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source
