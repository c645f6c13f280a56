-- A PHP-era schema with an audit trigger: every change of cola_envios.estado is copied into a
-- log table whose ENUM knows only the four PHP states. The trigger was created under MySQL 8's
-- default (strict) sql_mode, so a state it cannot store is an error, not a silent ''.
CREATE TABLE sesiones_envio (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(150) NOT NULL,
  estado ENUM('activa','pausada','completada') NOT NULL DEFAULT 'activa'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE cola_envios (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  mensaje TEXT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL DEFAULT 'pendiente',
  KEY idx_estado (estado)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE envios_whatsapp (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  wamid VARCHAR(100) NULL,
  fecha_envio DATETIME NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE cola_envios_log (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL,
  cambiado TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

SET SESSION sql_mode = 'STRICT_ALL_TABLES';

CREATE TRIGGER cola_envios_auditoria AFTER UPDATE ON cola_envios FOR EACH ROW
  INSERT INTO cola_envios_log (cola_id, estado) VALUES (NEW.id, NEW.estado);

SET SESSION sql_mode = '';

INSERT INTO sesiones_envio (id, nombre, estado) VALUES (28, 'sesion #28', 'activa');

INSERT INTO cola_envios (id, sesion_id, cliente_id, telefono, mensaje, estado) VALUES
  (1, 28, 601, '+51987000011', '{"type":"text","text":{"body":"hola"}}', 'pendiente'),
  (2, 28, 602, '+51987000012', '{"type":"text","text":{"body":"hola"}}', 'enviado'),
  (3, 28, 603, '+51987000013', '{"type":"text","text":{"body":"hola"}}', 'procesando');
