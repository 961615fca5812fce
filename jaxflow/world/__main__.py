import sys

from jaxflow.world.generate import main

sys.exit(main())
