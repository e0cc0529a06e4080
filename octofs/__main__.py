import sys

from octofs.cli import main

sys.exit(main())
