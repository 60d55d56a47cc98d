"""The workflow's logic, where pytest reaches it: config schema and validation (``config``), and what every
rule runs (``plan``). ``workflow/rules/*.smk`` only call into it. Standard library, PyYAML and jsonschema only."""
