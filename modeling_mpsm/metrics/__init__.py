"""`evaluate` metric modules of modeling_mpsm, loadable with `evaluate.load(<path of the module's folder>)`."""
