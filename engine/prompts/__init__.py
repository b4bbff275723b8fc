"""The bundled instruction list (instructions.txt), a package so that importlib.resources finds it in a wheel and a checkout alike."""
