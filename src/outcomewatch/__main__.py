import sys

from outcomewatch.cli import main

sys.exit(main())
