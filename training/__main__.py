import sys

from training.cli import main
from training.core.environment import hold_freed_memory

hold_freed_memory()  # a `python -m training` process does one job and exits (see hold_freed_memory)
sys.exit(main())
