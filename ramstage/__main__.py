from ramstage.cli import main

raise SystemExit(main())
