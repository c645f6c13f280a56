-- A latin1 table that PHP's old mysql_* functions filled through a latin1 connection with UTF-8
-- text: the bytes are UTF-8, the column says latin1. Read as latin1, "Ñandú" is "Ã‘andÃº".
-- (This file is UTF-8: the loader's utf8mb4 connection stores each character below as the one
-- latin1 byte it names, which is how those rows look on such a server.)
CREATE TABLE sesiones_envio (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(150) NOT NULL,
  estado ENUM('activa','pausada','completada') NOT NULL DEFAULT 'activa'
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE cola_envios (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  mensaje TEXT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL DEFAULT 'pendiente'
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

CREATE TABLE envios_whatsapp (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  wamid VARCHAR(100) NULL,
  fecha_envio DATETIME NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

INSERT INTO sesiones_envio (id, nombre) VALUES (50, 'campaÃ±a');

INSERT INTO cola_envios (id, sesion_id, cliente_id, telefono, mensaje) VALUES
  (1, 50, 801, '+51987500001', '{"type":"text","text":{"body":"Hola Ã‘andÃº"}}'),
  (2, 50, 802, '+51987500002', '{"type":"text","text":{"body":"CampaÃ±a de diciembre"}}'),
  (3, 50, 803, '+51987500003', '{"type":"text","text":{"body":"sin acentos"}}');
