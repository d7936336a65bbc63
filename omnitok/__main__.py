from omnitok.cli import main

raise SystemExit(main())
