from pneumo.cli import main

raise SystemExit(main())
