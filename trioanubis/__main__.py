from trioanubis.cli import main

raise SystemExit(main())
