"""`python -m serve BUNDLE` from a clone, `python -m layerprune.serve BUNDLE` where layerprune is installed: the
server under its one name, layerprune.serve."""
import sys

from layerprune.serve.main import main

sys.exit(main())
