"""The compliance report, by job: `evidence` (the period, the evidence tables, the figures and the failed
operations), `controls` (each control's test on that evidence), `frameworks/` (one module per framework:
its requirements by explicit identifier, mapped to our controls, and its verdict rule; found by a
registry), `rendering` (charts, HTML to PDF/A with WeasyPrint, signing), `oscal` (OSCAL Assessment
Results) and `report` (`build_report`: the whole run, stored and recorded)."""
