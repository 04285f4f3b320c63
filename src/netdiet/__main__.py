import sys

from netdiet.cli import main

sys.exit(main())
