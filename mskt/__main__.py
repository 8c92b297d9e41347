import sys

from mskt.cli import main

sys.exit(main())
