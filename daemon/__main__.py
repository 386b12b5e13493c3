from cruised.cli.main import main

raise SystemExit(main())
