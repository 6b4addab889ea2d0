"""``python -m fwcm.cli`` runs the ``fwcm`` command."""

from fwcm.cli.main import app

app()
