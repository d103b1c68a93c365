"""Compliance frameworks: one module each, with a module-level `FRAMEWORK` (base.Framework) naming its
requirements by explicit identifier, the controls of engine/compliance/controls.py that meet each, and its
verdict rule. `registry` finds them; a new framework is one new module here."""
