"""python -m fastsft ... == the fastsft command."""
import sys

from fastsft.cli import main

sys.exit(main())
