import sys

from service.archive.cli import main

sys.exit(main())
