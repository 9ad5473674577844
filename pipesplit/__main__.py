from pipesplit.cli import main

raise SystemExit(main())
