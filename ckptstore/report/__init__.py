"""``ckptstore report URL -o report.html``: one self-contained HTML page picturing a store.
Needs the ``report`` extra (plotly); nothing below the CLI imports it."""
