"""A real Hub-compatible server on 127.0.0.1 for the loading tests: olah serving local git repositories.

olah runs from its own virtual environment (its pinned dependencies clash with Jupyter's): ``olah-cli`` on
PATH or ``.venv-olah/bin/olah-cli`` (README.md's set-up installs it there).
"""
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_olah() -> str:
    found = shutil.which('olah-cli') or (ROOT / '.venv-olah' / 'bin' / 'olah-cli')
    if not Path(found).is_file():
        raise FileNotFoundError('olah-cli not found: run README.md set-up (python3 -m venv .venv-olah && '
                                '.venv-olah/bin/pip install olah)')
    return str(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _git(*args, cwd):
    subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True)


class HubServer:
    def __init__(self, base: Path):
        self.base = base
        self.mirrors = base / 'mirrors'
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.proc = None

    def add_repo(self, repo_id: str, folder: Path) -> None:
        """Serve ``folder``'s files as model repository ``repo_id`` (one commit on main)."""
        dest = self.mirrors / 'models' / repo_id
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        _git('init', '-q', '-b', 'main', cwd=dest)
        _git('add', '-A', cwd=dest)
        _git('-c', 'user.name=aft_vit tests', '-c', 'user.email=tests@localhost', 'commit', '-q', '-m', 'add',
             cwd=dest)

    def start(self) -> 'HubServer':
        probe = self.base / 'probe'
        probe.mkdir(parents=True)
        (probe / 'README.md').write_text('probe\n')
        self.add_repo('probe/probe', probe)
        config = self.base / 'olah.toml'
        config.write_text(
            '[basic]\n'
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'repos-path = "{self.base / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            '[accessibility]\noffline = true\n')
        self.log = open(self.base / 'olah.log', 'w')
        self.proc = subprocess.Popen([find_olah(), '-c', str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.base)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f'{self.url}/api/models/probe/probe/revision/main', timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f'olah did not start: {(self.base / "olah.log").read_text()[-2000:]}')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, 'log', None):
            self.log.close()
