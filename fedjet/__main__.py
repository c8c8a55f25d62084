import sys

from fedjet.cli import main

sys.exit(main())
