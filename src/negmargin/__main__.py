from negmargin.cli import main

raise SystemExit(main())
